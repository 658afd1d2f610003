// Writes to a cache in cache.wgsl's formats, prepended after it to the kernels that store
// (latent.wgsl, indexer.wgsl), whose `cache` binding is read_write.

// bf16 with round-to-nearest-even.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// Stores values i and i + 1 (i even) in the cache's format.
fn cache_store2(i: u32, a: f32, b: f32) {
    if (CACHE == 0u) {
        cache[i] = bitcast<u32>(a);
        cache[i + 1u] = bitcast<u32>(b);
    } else if (CACHE == 1u) {
        cache[i >> 1u] = pack2x16float(vec2<f32>(a, b));
    } else {
        cache[i >> 1u] = bf16_bits(a) | (bf16_bits(b) << 16u);
    }
}
