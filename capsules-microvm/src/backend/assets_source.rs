//! [`AssetSource`] for the asset cache of [`crate::assets`], and a fixed one for tests.

use std::path::PathBuf;

use async_trait::async_trait;
use capsules_core::types::Image;
use capsules_core::{Error, Result};

use super::adapters::{AssetSource, BootAssets};
use crate::assets::{Assets, BaseImage, Progress};
use crate::vmm::KernelFormat;

fn base_image(image: Image) -> BaseImage {
    match image {
        Image::Full => BaseImage::Full,
        Image::Small => BaseImage::Small,
    }
}

#[async_trait]
impl AssetSource for Assets {
    async fn ensure(&self, image: Image, format: KernelFormat) -> Result<BootAssets> {
        let assets = self.clone();
        let base = base_image(image);
        let manifest = tokio::task::spawn_blocking(move || assets.ensure(&[base], Progress::Auto))
            .await
            .map_err(|e| Error::internal("the guest asset build task failed").with_source(e))?
            .map_err(|e| {
                Error::internal(format!("could not prepare the guest assets for image {image}")).with_source(e)
            })?;
        let img = manifest
            .image(base)
            .ok_or_else(|| Error::internal(format!("the asset manifest {} has no base image {image}", manifest.key)))?;
        Ok(BootAssets {
            manifest_key: manifest.key.clone(),
            image_key: img.key.clone(),
            kernel: manifest.kernel_path(format).to_path_buf(),
            initramfs: manifest.initramfs.path.clone(),
            base_image: img.path.clone(),
        })
    }
}

/// Fixed asset paths (tests, or a host that manages its own kernel and images). Every image
/// maps to the same base image file.
#[derive(Debug, Clone)]
pub struct StaticAssets {
    /// Kernel (in the VMM's format).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// Base image for every [`Image`].
    pub base_image: PathBuf,
}

#[async_trait]
impl AssetSource for StaticAssets {
    async fn ensure(&self, image: Image, _format: KernelFormat) -> Result<BootAssets> {
        Ok(BootAssets {
            manifest_key: "static".to_owned(),
            image_key: format!("static-{image}"),
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            base_image: self.base_image.clone(),
        })
    }
}
