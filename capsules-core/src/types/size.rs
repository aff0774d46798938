use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// An approved capsule size from the launch catalogue: `<vcpus>x<mem>gb`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Size {
    S1x1gb,
    S2x2gb,
    S2x4gb,
    S4x8gb,
}

impl Size {
    /// The catalogue, smallest first.
    pub const ALL: [Size; 4] = [Size::S1x1gb, Size::S2x2gb, Size::S2x4gb, Size::S4x8gb];

    pub fn as_str(self) -> &'static str {
        match self {
            Size::S1x1gb => "1x1gb",
            Size::S2x2gb => "2x2gb",
            Size::S2x4gb => "2x4gb",
            Size::S4x8gb => "4x8gb",
        }
    }
    pub fn vcpus(self) -> u32 {
        match self {
            Size::S1x1gb => 1,
            Size::S2x2gb | Size::S2x4gb => 2,
            Size::S4x8gb => 4,
        }
    }
    pub fn memory_mib(self) -> u64 {
        match self {
            Size::S1x1gb => 1024,
            Size::S2x2gb => 2048,
            Size::S2x4gb => 4096,
            Size::S4x8gb => 8192,
        }
    }
    /// Largest disk this size may have, in GiB.
    pub fn max_disk_gib(self) -> u32 {
        match self {
            Size::S1x1gb => 10,
            Size::S2x2gb => 20,
            Size::S2x4gb => 40,
            Size::S4x8gb => 80,
        }
    }

    fn catalogue() -> String {
        Size::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
    }

    pub fn parse(s: &str) -> Result<Self> {
        if let Some(found) = Size::ALL.iter().find(|z| z.as_str() == s) {
            return Ok(*found);
        }
        let lower = s.to_ascii_lowercase();
        if lower.contains("gpu") {
            return Err(Error::unsupported(format!(
                "size {s:?} asks for a GPU; capsules have no GPUs (they are for CPU-bound engineering work); approved sizes are {}",
                Self::catalogue()
            )));
        }
        Err(Error::invalid_input(format!(
            "size {s:?} is not an approved size; approved sizes are {}",
            Self::catalogue()
        )))
    }
}

impl FromStr for Size {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> serde::Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Size::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn catalogue() {
        let s = Size::parse("2x2gb").unwrap();
        assert_eq!((s.vcpus(), s.memory_mib()), (2, 2048));
        let e = Size::parse("3x3gb").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.message().contains("1x1gb, 2x2gb, 2x4gb, 4x8gb"));
        assert_eq!(Size::parse("gpu-1x").unwrap_err().kind(), ErrorKind::Unsupported);
    }
}
