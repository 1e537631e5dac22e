//! Functions on a node: arbord's function gateway. A user deploys a function (an image and a
//! port) and invokes it; the gateway runs instances of it as containers through containerd
//! (the `arbor` snapshotter and runtime, each instance in a CNI bridge network namespace),
//! starts one when a request finds none free (a cold start), keeps `min_instances` warm,
//! queues what it cannot serve yet (then 429), and stops instances idle past their timeout
//! (scale to zero).
//!
//! * [`def`]: definitions, their validation and their records on disk;
//! * [`pool`]: the invoke path, instances' life and the reconciler;
//! * [`net`]: an instance's network namespace and CNI;
//! * [`api`]: the HTTP/JSON API; [`metrics`]: Prometheus text.

pub mod api;
pub mod def;
pub mod error;
pub mod metrics;
pub mod net;
pub mod pool;

pub use def::{FunctionRecord, FunctionSpec};
pub use error::{Error, Result};
pub use net::NetConfig;
pub use pool::{FunctionView, Gateway, GatewayOptions, InstanceView};
