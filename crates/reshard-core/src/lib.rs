//! reshard-core: convert MindSpore distributed checkpoints between parallel layouts.
//!
//! The data path: strategy files -> layouts -> per-rank boxes -> plan (copy pieces) ->
//! executor (memory-mapped sources, strided copies, atomic outputs).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod formats;
pub use formats::{checkpoint, ckpt, safetensors};
pub mod dtype;
pub mod error;
pub mod input;
pub mod layout;
pub mod region;
pub mod strategy;
mod sys;
#[allow(missing_docs)]
pub mod wire;

pub use checkpoint::{CheckpointFile, CheckpointIndex, Format, ReadOptions, TensorInfo};
pub use dtype::DType;
pub use error::{Error, Result};
pub use region::Region;
pub use strategy::Strategy;
pub use sys::{map_large_allocations, reuse_freed_memory};
pub mod exec;
pub use exec as execute;
pub mod plan;
pub mod source;
pub mod source_unified;
pub mod storage;
pub mod unify;

pub use exec::memory::{load_rank, rank_reads, FileReads, LoadOptions, TensorMeta};
pub use exec::{execute, ExecuteOptions, WrittenFile};
pub use plan::{CopyPiece, Plan, PlanOptions, RankPlan, TensorPlan, TensorSource};
pub mod atomic;
pub mod auto;
pub mod distributed;
pub mod manifest;
pub mod mindformers;
pub mod report;
pub mod strategy_new;
pub mod toc_predict;
