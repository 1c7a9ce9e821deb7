"""What only a machine without Metal needs: OpenBLAS (blas.py), MLX kernels built for this CPU
(kernels.py), one stream per core (streams.py), a quantized base dequantized per matmul
(dequant_matmul.py), and the process set-up for commands that compute (process.py). On a Mac
none of it runs. Imports models/ (class swaps) and the shared helpers."""
