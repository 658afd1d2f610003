// Per-step values written once before each submit (prepended by the loader).
struct Step {
    // Tokens in this step (a prefill chunk, or 1 when decoding).
    n_tokens: u32,
    // Position of the first of them (tokens already in the latent cache).
    start: u32,
    // First row whose logits are wanted (n_tokens - 1 when only the last position's are).
    logits_row0: u32,
    _pad: u32,
}
