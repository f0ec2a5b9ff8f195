//! Element types, named as MindSpore names them in `.ckpt` files.

use std::fmt;

/// A tensor element type. Names and sizes follow MindSpore's `tensor_to_ms_type` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)] // the variants are MindSpore's type names
pub enum DType {
    Int8,
    UInt8,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    Float16,
    Float32,
    Float64,
    Bool,
    BFloat16,
    /// MindSpore's `qint4x2`: one byte holds two 4-bit values; shapes count bytes.
    Int4,
    /// A string, stored as UTF-32LE; never sliced.
    Str,
}

impl DType {
    /// Every type, for tables and tests.
    pub const ALL: [DType; 15] = [
        DType::Int8,
        DType::UInt8,
        DType::Int16,
        DType::UInt16,
        DType::Int32,
        DType::UInt32,
        DType::Int64,
        DType::UInt64,
        DType::Float16,
        DType::Float32,
        DType::Float64,
        DType::Bool,
        DType::BFloat16,
        DType::Int4,
        DType::Str,
    ];

    /// The `tensor_type` string of a `.ckpt` file.
    pub fn ckpt_name(self) -> &'static str {
        match self {
            DType::Int8 => "Int8",
            DType::UInt8 => "UInt8",
            DType::Int16 => "Int16",
            DType::UInt16 => "UInt16",
            DType::Int32 => "Int32",
            DType::UInt32 => "UInt32",
            DType::Int64 => "Int64",
            DType::UInt64 => "UInt64",
            DType::Float16 => "Float16",
            DType::Float32 => "Float32",
            DType::Float64 => "Float64",
            DType::Bool => "Bool",
            DType::BFloat16 => "BFloat16",
            DType::Int4 => "Int4",
            DType::Str => "str",
        }
    }

    /// Parses a `.ckpt` `tensor_type` string.
    pub fn from_ckpt_name(s: &str) -> Option<DType> {
        DType::ALL.iter().copied().find(|d| d.ckpt_name() == s)
    }

    /// The safetensors dtype string, `None` for types safetensors cannot hold.
    pub fn safetensors_name(self) -> Option<&'static str> {
        Some(match self {
            DType::Int8 | DType::Int4 => "I8",
            DType::UInt8 => "U8",
            DType::Int16 => "I16",
            DType::UInt16 => "U16",
            DType::Int32 => "I32",
            DType::UInt32 => "U32",
            DType::Int64 => "I64",
            DType::UInt64 => "U64",
            DType::Float16 => "F16",
            DType::Float32 => "F32",
            DType::Float64 => "F64",
            DType::Bool => "BOOL",
            DType::BFloat16 => "BF16",
            DType::Str => return None,
        })
    }

    /// Parses a safetensors dtype string.
    pub fn from_safetensors_name(s: &str) -> Option<DType> {
        Some(match s {
            "I8" => DType::Int8,
            "U8" => DType::UInt8,
            "I16" => DType::Int16,
            "U16" => DType::UInt16,
            "I32" => DType::Int32,
            "U32" => DType::UInt32,
            "I64" => DType::Int64,
            "U64" => DType::UInt64,
            "F16" => DType::Float16,
            "F32" => DType::Float32,
            "F64" => DType::Float64,
            "BOOL" => DType::Bool,
            "BF16" => DType::BFloat16,
            _ => return None,
        })
    }

    /// Bytes per element (for `Str`, per UTF-32 code unit).
    pub fn size(self) -> u64 {
        match self {
            DType::Int8 | DType::UInt8 | DType::Bool | DType::Int4 => 1,
            DType::Int16 | DType::UInt16 | DType::Float16 | DType::BFloat16 => 2,
            DType::Int32 | DType::UInt32 | DType::Float32 | DType::Str => 4,
            DType::Int64 | DType::UInt64 | DType::Float64 => 8,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ckpt_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_ckpt_name(d.ckpt_name()), Some(d));
            if let Some(s) = d.safetensors_name() {
                if d != DType::Int4 {
                    assert_eq!(DType::from_safetensors_name(s), Some(d));
                }
            }
        }
        assert_eq!(DType::from_ckpt_name("float32"), None);
    }
}
