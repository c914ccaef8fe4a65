//! The networks, one file per network (field names = checkpoint key segments).

pub mod face_locator;
pub mod vae;
