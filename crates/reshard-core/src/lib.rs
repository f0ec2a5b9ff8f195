//! reshard-core: convert MindSpore distributed checkpoints between parallel layouts.
//!
//! The data path: strategy files -> layouts -> per-rank boxes -> plan (copy pieces) ->
//! executor (memory-mapped sources, strided copies, atomic outputs).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod checkpoint;
pub mod ckpt;
pub mod dtype;
pub mod error;
pub mod input;
pub mod layout;
pub mod region;
pub mod safetensors;
pub mod strategy;
mod sys;
#[allow(missing_docs)]
pub mod wire;

pub use checkpoint::{CheckpointFile, CheckpointIndex, Format, ReadOptions, TensorInfo};
pub use dtype::DType;
pub use error::{Error, Result};
pub use region::Region;
pub use strategy::Strategy;
pub mod execute;
pub mod plan;
pub mod source;

pub use execute::{execute, ExecuteOptions, WrittenFile};
pub use plan::{CopyPiece, Plan, PlanOptions, RankPlan, TensorPlan, TensorSource};
pub mod atomic;
pub mod auto;
pub mod distributed;
pub mod manifest;
pub mod report;
pub mod strategy_new;
