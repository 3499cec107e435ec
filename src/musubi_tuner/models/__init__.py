"""Reading and writing model files safely, and the key-layout glue shared by the architectures."""
