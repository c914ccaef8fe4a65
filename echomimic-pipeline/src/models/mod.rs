pub mod mtcnn;
