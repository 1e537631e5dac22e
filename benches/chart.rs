//! Horizontal stacked bar charts as PNG files, with no dependency beyond `flate2`: an RGB canvas, a
//! built-in 5x7 bitmap font (with descenders), and a PNG encoder (8-bit truecolor, one IDAT chunk
//! compressed with zlib, CRC-32 from `flate2::Crc`).

use std::io::Write;

use anyhow::Result;
use flate2::Compression;
use flate2::write::ZlibEncoder;

pub type Rgb = [u8; 3];

pub const WHITE: Rgb = [255, 255, 255];
pub const BLACK: Rgb = [0, 0, 0];
pub const GREY: Rgb = [110, 110, 110];
pub const LIGHT_GREY: Rgb = [225, 225, 225];

/// An RGB image, row-major, top row first.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Canvas {
        Canvas {
            width,
            height,
            pixels: background.repeat(width * height),
        }
    }

    pub fn pixel(&self, x: usize, y: usize) -> Rgb {
        let i = (y * self.width + x) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Fills the rectangle at (x, y) of size w × h, clipped to the canvas.
    pub fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, color: Rgb) {
        let x0 = x.clamp(0, self.width as i64) as usize;
        let x1 = (x + w).clamp(0, self.width as i64) as usize;
        let y0 = y.clamp(0, self.height as i64) as usize;
        let y1 = (y + h).clamp(0, self.height as i64) as usize;
        for row in y0..y1 {
            for col in x0..x1 {
                let i = (row * self.width + col) * 3;
                self.pixels[i..i + 3].copy_from_slice(&color);
            }
        }
    }

    /// Draws `text` with its top left corner at (x, y), each font pixel `scale` × `scale`;
    /// returns the x after the last glyph.
    pub fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) -> i64 {
        let mut cx = x;
        for ch in text.chars() {
            let rows = glyph(ch);
            for (r, bits) in rows.iter().enumerate() {
                for c in 0..5 {
                    if bits & (0x10 >> c) != 0 {
                        self.fill(cx + c * scale, y + r as i64 * scale, scale, scale, color);
                    }
                }
            }
            cx += ADVANCE * scale;
        }
        cx
    }

    /// The PNG file of the canvas.
    pub fn png(&self) -> Result<Vec<u8>> {
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend_from_slice(&u32::try_from(self.width)?.to_be_bytes());
        ihdr.extend_from_slice(&u32::try_from(self.height)?.to_be_bytes());
        // Bit depth 8, colour type 2 (truecolor), deflate, adaptive filtering, no interlace.
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut z = ZlibEncoder::new(Vec::new(), Compression::best());
        for row in self.pixels.chunks(self.width * 3) {
            // Filter type 0 (None) for every scanline.
            z.write_all(&[0])?;
            z.write_all(row)?;
        }
        let idat = z.finish()?;
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        for (kind, data) in [
            (b"IHDR", &ihdr[..]),
            (b"IDAT", &idat[..]),
            (b"IEND", &[][..]),
        ] {
            out.extend_from_slice(&u32::try_from(data.len())?.to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let mut crc = flate2::Crc::new();
            crc.update(kind);
            crc.update(data);
            out.extend_from_slice(&crc.sum().to_be_bytes());
        }
        Ok(out)
    }
}

/// Horizontal distance between glyphs, in font pixels (5 wide plus 1 of space).
const ADVANCE: i64 = 6;
/// Glyph height above the baseline in font pixels (descenders go 2 below).
const GLYPH_H: i64 = 7;

/// Width of `text` in pixels at `scale`.
pub fn text_width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * ADVANCE * scale - scale
}

/// The bitmap of `ch`: 5 pixels wide, 7 rows from the cap height to the baseline and 2 more for
/// descenders, top first, bit 4 the leftmost pixel. Characters without a glyph are drawn as `?`.
fn glyph(ch: char) -> [u8; 9] {
    match ch {
        ' ' => [0; 9],
        '!' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x04, 0x00, 0x00],
        '"' => [0x0A, 0x0A, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A, 0x00, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00, 0x00],
        '\'' => [0x04, 0x04, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00, 0x00],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00, 0x00],
        '*' => [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x04, 0x08],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00, 0x00],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00, 0x00],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00, 0x00],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00, 0x00],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00, 0x00],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00, 0x00],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00, 0x00],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00, 0x00],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00, 0x00],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00, 0x00],
        ';' => [0x00, 0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x04, 0x08],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02, 0x00, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08, 0x00, 0x00],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04, 0x00, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x00, 0x00],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00, 0x00],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00, 0x00],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00, 0x00],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00, 0x00],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00, 0x00],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00, 0x00],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00, 0x00],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00, 0x00],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00, 0x00],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00, 0x00],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00, 0x00],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00, 0x00],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00, 0x00],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00, 0x00],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00, 0x00],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00, 0x00],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x00, 0x00],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00, 0x00],
        '[' => [0x0E, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0E, 0x00, 0x00],
        ']' => [0x0E, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0E, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00, 0x00],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00, 0x00],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00, 0x00],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00, 0x00],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00, 0x00],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00, 0x00],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00, 0x00],
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00, 0x00],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00, 0x00],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11, 0x00, 0x00],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00, 0x00],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00, 0x00],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00, 0x00],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E, 0x00, 0x00],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00, 0x00],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00, 0x00],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00, 0x00],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00, 0x00],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00, 0x00],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00, 0x00],
        '|' => [0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00, 0x00],
        '\u{2265}' => [0x08, 0x04, 0x02, 0x04, 0x08, 0x00, 0x1F, 0x00, 0x00], // ≥
        '\u{2264}' => [0x02, 0x04, 0x08, 0x04, 0x02, 0x00, 0x1F, 0x00, 0x00], // ≤
        _ => glyph('?'),
    }
}

// ---------------------------------------------------------------------------------------------
// Stacked bar charts

/// One bar: its label, one value per segment (in the chart's unit), the text right of it.
pub struct Bar {
    pub label: String,
    pub values: Vec<f64>,
    pub note: String,
}

/// A group of bars under a heading (e.g. one image).
pub struct Group {
    pub heading: String,
    pub bars: Vec<Bar>,
}

/// Horizontal bars of stacked segments, a legend of the segments and an x axis.
pub struct BarChart {
    pub title: String,
    /// Lines under the title.
    pub subtitle: Vec<String>,
    /// Segment names and colours, in stacking order (left to right).
    pub segments: Vec<(String, Rgb)>,
    pub groups: Vec<Group>,
    /// The x axis label (e.g. "seconds").
    pub axis_label: String,
}

const SCALE: i64 = 2;
const LINE: i64 = (GLYPH_H + 4) * SCALE;
const MARGIN: i64 = 24;
const BAR_H: i64 = 34;
const BAR_GAP: i64 = 14;
/// Minimum width; wider if a title line needs it.
const WIDTH: i64 = 1200;

impl BarChart {
    /// Draws the chart.
    pub fn render(&self) -> Canvas {
        let widest = |text: fn(&Bar) -> &str| {
            let bars = self.groups.iter().flat_map(|g| &g.bars);
            bars.map(|b| text_width(text(b), SCALE)).max().unwrap_or(0) + 16
        };
        let label_w = widest(|b| &b.label);
        let note_w = widest(|b| &b.note);
        let width = std::iter::once(&self.title)
            .chain(&self.subtitle)
            .map(|t| text_width(t, SCALE) + 2 * MARGIN)
            .fold(WIDTH, i64::max);
        let x0 = MARGIN + label_w;
        let x1 = (width - MARGIN - note_w).max(x0 + 200);
        let header_h = LINE * 2 + LINE * self.subtitle.len() as i64 + LINE + 8;
        let bars_h: i64 = self
            .groups
            .iter()
            .map(|g| LINE + 4 + g.bars.len() as i64 * (BAR_H + BAR_GAP))
            .sum();
        let height = MARGIN + header_h + bars_h + LINE * 3 + MARGIN;
        let mut c = Canvas::new(width as usize, height as usize, WHITE);

        let mut y = MARGIN;
        c.text(MARGIN, y, &self.title, SCALE, BLACK);
        y += LINE + LINE / 2;
        for line in &self.subtitle {
            c.text(MARGIN, y, line, SCALE, GREY);
            y += LINE;
        }
        y += LINE / 2;
        // Legend.
        let mut lx = MARGIN;
        for (name, color) in &self.segments {
            c.fill(lx, y, 7 * SCALE, 7 * SCALE, *color);
            lx = c.text(lx + 10 * SCALE, y, name, SCALE, BLACK) + 14 * SCALE;
        }
        y += LINE + 8;

        // Axis scale: a round step giving 4 to 10 ticks.
        let max = self
            .groups
            .iter()
            .flat_map(|g| &g.bars)
            .map(|b| b.values.iter().filter(|v| v.is_finite()).sum::<f64>())
            .fold(0.0, f64::max);
        let step = nice_step(max);
        let top = (max / step).ceil().max(1.0) * step;
        let px = |v: f64| x0 + ((v / top) * (x1 - x0) as f64).round() as i64;
        let plot_top = y;
        let plot_bottom = y + bars_h;
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            c.fill(px(t), plot_top, 1, plot_bottom - plot_top, LIGHT_GREY);
            t += step;
        }

        for g in &self.groups {
            if !g.heading.is_empty() {
                c.text(MARGIN, y, &g.heading, SCALE, BLACK);
            }
            y += LINE + 4;
            for b in &g.bars {
                let ty = y + (BAR_H - GLYPH_H * SCALE) / 2;
                c.text(
                    x0 - 12 - text_width(&b.label, SCALE),
                    ty,
                    &b.label,
                    SCALE,
                    BLACK,
                );
                let mut acc = 0.0;
                for (v, (_, color)) in b.values.iter().zip(&self.segments) {
                    if !v.is_finite() || *v <= 0.0 {
                        continue;
                    }
                    let (a, z) = (px(acc), px(acc + v));
                    c.fill(a, y, (z - a).max(1), BAR_H, *color);
                    acc += v;
                }
                c.text(px(acc) + 10, ty, &b.note, SCALE, BLACK);
                y += BAR_H + BAR_GAP;
            }
        }

        // The axis: line, ticks and their labels, then the axis label.
        c.fill(x0, plot_bottom, x1 - x0 + 1, 2, BLACK);
        let mut t = 0.0;
        while t <= top + step / 2.0 {
            let x = px(t);
            c.fill(x, plot_bottom, 2, 8, BLACK);
            let label = format_tick(t, step);
            c.text(
                x - text_width(&label, SCALE) / 2,
                plot_bottom + 14,
                &label,
                SCALE,
                BLACK,
            );
            t += step;
        }
        let al = &self.axis_label;
        c.text(
            (x0 + x1) / 2 - text_width(al, SCALE) / 2,
            plot_bottom + 14 + LINE + 4,
            al,
            SCALE,
            GREY,
        );
        c
    }
}

/// The smallest of 1, 2 or 5 times a power of ten such that `max` spans at most 8 steps.
fn nice_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let pow = 10f64.powf((max / 5.0).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| max / s <= 8.0)
        .unwrap_or(10.0 * pow)
}

fn format_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_structure() {
        let mut c = Canvas::new(3, 2, WHITE);
        c.fill(0, 0, 1, 1, [255, 0, 0]);
        let png = c.png().unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 3);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 2);
        // The IHDR CRC of a 3x2 truecolor image, as computed by zlib's crc32.
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        assert_eq!(png[29..33], crc.sum().to_be_bytes());
        assert_eq!(&png[png.len() - 12..], b"\0\0\0\0IEND\xaeB`\x82");
        // The image data inflates back to the filtered scanlines.
        let idat_len = u32::from_be_bytes(png[33..37].try_into().unwrap()) as usize;
        assert_eq!(&png[37..41], b"IDAT");
        let mut d = flate2::read::ZlibDecoder::new(&png[41..41 + idat_len]);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut raw).unwrap();
        assert_eq!(
            raw,
            [
                0, 255, 0, 0, 255, 255, 255, 255, 255, 255, //
                0, 255, 255, 255, 255, 255, 255, 255, 255, 255
            ]
        );
    }

    #[test]
    fn steps() {
        assert_eq!(nice_step(10.0), 2.0);
        assert_eq!(nice_step(3.0), 0.5);
        assert_eq!(nice_step(47.0), 10.0);
        assert_eq!(nice_step(0.0), 1.0);
        for m in [0.3, 1.0, 7.7, 12.0, 99.0, 250.0] {
            let steps = m / nice_step(m);
            assert!((2.0..=8.0).contains(&steps), "{m}: {steps} steps");
        }
    }
}
