// Stores one step's latents in the MLA cache: per token t at its position pos, in the rows of
// its sequence (from row0; `positions` holds (pos, row0) per token),
//   cache[row0 + pos, :lora]  = RMSNorm(kv[t, :lora])        (c_kv)
//   cache[row0 + pos, lora:]  = rope(kv[t, lora:], pos)       (k_pe, interleaved pairs)
// One workgroup per token.

const WG: u32 = 64u;

struct Params {
    lora: u32,
    rope: u32,
    eps: f32,
    rope_scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> kv: array<f32>;
@group(0) @binding(2) var<storage, read> norm: array<f32>;
@group(0) @binding(3) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read_write> cache: array<u32>;

var<workgroup> sums: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {
    let t = wid.x;
    let latent = p.lora + p.rope;
    let src = t * latent;
    let pos = positions[2u * t];
    let dst = (positions[2u * t + 1u] + pos) * latent;
    var acc = 0.0;
    for (var c = lane; c < p.lora; c += WG) {
        let v = kv[src + c];
        acc += v * v;
    }
    sums[lane] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            sums[lane] += sums[lane + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(sums[0] / f32(p.lora) + p.eps);
    if (CACHE == 0u) {
        for (var c = lane; c < p.lora; c += WG) {
            cache[dst + c] = bitcast<u32>(norm[c] * (kv[src + c] * inv));
        }
    } else {
        // 16-bit: a pair of values per word (the latent width is even).
        for (var c2 = lane; c2 < p.lora / 2u; c2 += WG) {
            let c = 2u * c2;
            cache_store2(dst + c, norm[c] * (kv[src + c] * inv), norm[c + 1u] * (kv[src + c + 1u] * inv));
        }
    }
    for (var j = lane; j < p.rope / 2u; j += WG) {
        let angle = f32(pos) * inv_freq[j];
        let cs = cos(angle) * p.rope_scale;
        let sn = sin(angle) * p.rope_scale;
        let a = kv[src + p.lora + 2u * j];
        let b = kv[src + p.lora + 2u * j + 1u];
        cache_store2(dst + p.lora + 2u * j, a * cs - b * sn, a * sn + b * cs);
    }
}
