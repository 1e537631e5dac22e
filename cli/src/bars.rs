//! Progress bars on a terminal (indicatif), one per layer being converted.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use arbor_convert::progress::{Event, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
    enabled: bool,
}

impl Bars {
    pub fn new() -> Self {
        let enabled = std::io::stderr().is_terminal();
        let multi = MultiProgress::with_draw_target(if enabled {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        });
        Bars {
            multi,
            bars: Mutex::new(HashMap::new()),
            enabled,
        }
    }
}

fn short(d: &str) -> &str {
    let h = d.strip_prefix("sha256:").unwrap_or(d);
    &h[..h.len().min(12)]
}

impl Progress for Bars {
    fn event(&self, e: Event) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        match e {
            Event::LayerStarted { digest, size } => {
                let bar = self.multi.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(short(&digest).to_string());
                bars.insert(digest, bar);
            }
            Event::LayerRead { digest, bytes } => {
                if let Some(b) = bars.get(&digest) {
                    b.set_position(bytes);
                }
            }
            Event::LayerDone { digest } => {
                if let Some(b) = bars.remove(&digest) {
                    b.finish_with_message("converted");
                }
            }
            Event::LayerKept { digest } => {
                if self.enabled {
                    let _ = self
                        .multi
                        .println(format!("{} already converted, kept", short(&digest)));
                }
            }
            Event::Message(m) => {
                if self.enabled {
                    let _ = self.multi.println(m);
                } else {
                    eprintln!("{m}");
                }
            }
        }
    }
}
