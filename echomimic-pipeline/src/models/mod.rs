//! The networks, one file per Python module of the reference code (field
//! names = checkpoint key segments).

pub mod attention;
pub mod embeddings;
pub mod face_locator;
pub mod motion_module;
pub mod mtcnn;
pub mod resnet;
pub mod transformer_2d;
pub mod transformer_3d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod unet_3d;
pub mod unet_3d_blocks;
pub mod vae;
pub mod whisper;
