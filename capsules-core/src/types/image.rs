use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A base image a capsule boots from.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Image {
    /// Debian 12 with git, curl, ca-certificates, nodejs, npm, python3, build-essential.
    #[default]
    Full,
    /// Debian 12 minbase plus what the contract tests need.
    Small,
}

impl Image {
    pub const ALL: [Image; 2] = [Image::Full, Image::Small];

    pub fn as_str(self) -> &'static str {
        match self {
            Image::Full => "full",
            Image::Small => "small",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(Image::Full),
            "small" => Ok(Image::Small),
            _ if s.to_ascii_lowercase().starts_with("windows") => Err(Error::unsupported(format!(
                "image {s:?} is a Windows guest; capsules run Linux only; images are full, small"
            ))),
            _ => Err(Error::invalid_input(format!(
                "image {s:?} is not known; images are full, small"
            ))),
        }
    }
}

impl FromStr for Image {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
impl fmt::Display for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl serde::Serialize for Image {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> serde::Deserialize<'de> for Image {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Image::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The region a capsule runs in. One at launch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum Region {
    #[default]
    EuCentral,
}

impl Region {
    pub fn as_str(self) -> &'static str {
        "eu-central"
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "eu-central" => Ok(Region::EuCentral),
            _ => Err(Error::unsupported(format!(
                "region {s:?} is not available; capsules run in eu-central only at launch"
            ))),
        }
    }
}

impl FromStr for Region {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
impl serde::Serialize for Region {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}
impl<'de> serde::Deserialize<'de> for Region {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Region::parse(&s).map_err(serde::de::Error::custom)
    }
}
