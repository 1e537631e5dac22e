//! Function trees on the wire. `arbor-p2p` decides who is whose parent; this crate moves that
//! decision and the bytes between nodes, over the `arbor.v1.Peer` and `arbor.v1.Tree` gRPC
//! services (`proto/proto/arbor/v1/p2p.proto`):
//!
//! - [`source`]: [`PeerSource`], a [`arbor_fetch::source::BlobSource`] that reads blob ranges
//!   from a parent's Peer service, with a stall deadline (no byte and no keep-alive within it:
//!   the parent is given up and the router tries the next source);
//! - [`server`]: [`PeerService`], the Peer service (`arbor_proto::arbor::peer_server::Peer`): serves the blobs a [`server::Provider`]
//!   names, streaming pieces as they arrive, within a node-wide upload limit;
//! - [`tree`]: [`TreeService`], the Tree service (`arbor_proto::arbor::tree_server::Tree`) around [`arbor_p2p::Manager`] (heartbeat expiry,
//!   watch streams, state in a [`arbor_p2p::Store`]);
//! - [`member`]: [`Member`], a node's client of the Tree service: joins a function's tree,
//!   heartbeats, and reports each change of its position.
//!
//! Nothing here verifies bytes: the receiving node checks every block against the layer's TOC
//! block table (`arbor_fetch::blocks`) before it uses, caches or forwards it.

pub mod etcd;
pub mod member;
pub mod server;
pub mod source;
pub mod tree;

pub use member::Member;
pub use server::PeerService;
pub use source::PeerSource;
pub use tree::TreeService;
