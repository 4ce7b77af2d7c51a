"""Channel synthesis (Sionna TR 38.901) and mmWave DFT codebooks."""
from fedfm.channels.codebook import beam_gains, best_beam, dft_codebook, ula_steering

__all__ = ["beam_gains", "best_beam", "dft_codebook", "ula_steering"]
