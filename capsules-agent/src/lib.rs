//! The Capsules guest agent: the wire protocol (shared with the host) and the
//! async host-side client.
