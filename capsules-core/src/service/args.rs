//! Arguments that may come as text (validated when the call runs) or as typed values.

use std::time::Duration;

use crate::error::Result;
use crate::types::{Image, MicroCredits, NetworkPolicy, Region, Size, UrlAccess};

/// A value given as text (parsed, with an error naming the rule) or already typed.
pub trait Arg<T> {
    fn into_arg(self) -> Result<T>;
}

macro_rules! text_arg {
    ($t:ty, $parse:path) => {
        impl Arg<$t> for &str {
            fn into_arg(self) -> Result<$t> {
                $parse(self)
            }
        }
        impl Arg<$t> for String {
            fn into_arg(self) -> Result<$t> {
                $parse(&self)
            }
        }
        impl Arg<$t> for &String {
            fn into_arg(self) -> Result<$t> {
                $parse(self)
            }
        }
        impl Arg<$t> for $t {
            fn into_arg(self) -> Result<$t> {
                Ok(self)
            }
        }
    };
}

text_arg!(Size, Size::parse);
text_arg!(Image, Image::parse);
text_arg!(Region, Region::parse);
text_arg!(MicroCredits, MicroCredits::parse);
text_arg!(NetworkPolicy, NetworkPolicy::parse);
text_arg!(UrlAccess, UrlAccess::parse);

impl Arg<Duration> for Duration {
    fn into_arg(self) -> Result<Duration> {
        Ok(self)
    }
}

/// Deferred validation: the first error wins when the call runs.
pub(crate) fn keep<T, A: Arg<T>>(a: A) -> Option<Result<T>> {
    Some(a.into_arg())
}
