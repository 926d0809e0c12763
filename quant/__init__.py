"""Bundle -> smaller bundle (int8 / int4 / fp16 / mixed precision). See the quantization issue."""
