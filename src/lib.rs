pub use ordo_proto as proto;
