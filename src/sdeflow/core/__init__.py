"""The numerical core, written once in the EDM view: forward processes, the denoiser and its preconditioning, the
denoising loss and the classic recipes, and an exact Gaussian-mixture oracle."""
