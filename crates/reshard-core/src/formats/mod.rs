//! Checkpoint file formats: the readers (tables of contents through byte sources) and the
//! writers' codecs.

pub mod checkpoint;
pub mod ckpt;
pub mod codec;
pub mod mindformers;
pub mod safetensors;
