//! Element types. The numeric ids are part of the plugin ABI (`SD3_DTYPE_*` in `plugins/include/sd3_plugin.h`):
//! never renumber, only append.

use half::{bf16, f16};

/// Element type of a tensor.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    I32 = 3,
    I64 = 4,
    U8 = 5,
}

impl DType {
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8];
    /// The floating-point types, in which every float op is defined.
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    pub fn from_id(id: u32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as u32 == id)
    }

    /// Bit of this dtype in a dtype mask (`1 << id`), as devices report what they support.
    pub fn mask_bit(self) -> u32 {
        1 << (self as u32)
    }

    /// Convert little-endian bytes of this dtype to f32 values (integers convert exactly up to 2^24).
    pub fn bytes_to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let n = bytes.len() / self.size_in_bytes();
        let mut out = Vec::with_capacity(n);
        match self {
            DType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            DType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::I32 => {
                out.extend(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32))
            }
            DType::I64 => out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32),
            ),
            DType::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
        }
        out
    }

    /// Convert f32 values to little-endian bytes of this dtype (round to nearest even; integers truncate toward 0).
    pub fn f32_to_bytes(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size_in_bytes());
        for &v in values {
            match self {
                DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
                DType::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
                DType::I64 => out.extend_from_slice(&(v as i64).to_le_bytes()),
                DType::U8 => out.push(v as u8),
            }
        }
        out
    }

    /// Round an f32 value to the nearest value representable in this dtype.
    pub fn round_f32(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => f16::from_f32(v).to_f32(),
            DType::BF16 => bf16::from_f32(v).to_f32(),
            DType::I32 => v as i32 as f32,
            DType::I64 => v as i64 as f32,
            DType::U8 => v as u8 as f32,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(DType::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "i32" | "int32" => Ok(DType::I32),
            "i64" | "int64" => Ok(DType::I64),
            "u8" | "uint8" => Ok(DType::U8),
            _ => Err(format!("unknown dtype `{s}` (expected one of f32, f16, bf16, i32, i64, u8)")),
        }
    }
}
