// Causal latent attention (absorbed MLA) split over the sequence (flash-decoding, FlashMLA's
// shape): `partial` runs one workgroup per (group of HG heads, token, split of `chunk` cache
// positions); the group's heads share every cache row it reads, lanes read consecutive floats of
// a row (coalesced), scores go through an online softmax, and no scores row is kept. Each split
// writes (max m, sum l, unnormalised o_lat) per head; `merge` combines the splits per (head, token).
// A token attends to its sequence's cache rows row0 .. row0 + pos (`positions`: (pos, row0)), or
// to the rows its indexer selected (`attended_row`, attention_params.wgsl).
//
// Lane `lane` owns latent columns lane + 64 j (j < CPL): its slice of each head's query, of each
// cache row, and of each head's output. A tile's HG x TP scores are partial dots summed across
// lanes (sum_over_lanes, HG x TP <= 32).

override LORA: u32;
override ROPE: u32;
// Heads per workgroup: HG * ceil(LORA / 64) output accumulators per lane (<= 64).
override HG: u32;
const TP: u32 = 4u; // cache positions per tile
const MAX_CPL: u32 = 10u; // latent columns per lane: LORA + ROPE <= 640

@group(0) @binding(6) var<storage, read_write> o_lat: array<f32>;

var<workgroup> probs: array<f32, 32>; // HG x TP
var<workgroup> alpha: array<f32, 8>;

@compute @workgroup_size(64)
fn partial_split(@builtin(workgroup_id) wid: vec3<u32>, ids: LaneIds) {
    let lane = ids.lane;
    let latent = LORA + ROPE;
    let cpl = (latent + WG - 1u) / WG;
    let h0 = wid.x * HG;
    let t = wid.y;
    let split = wid.z;
    let begin = split * p.chunk;
    let end = min(begin + p.chunk, attended(t));

    // The lane's slice of each head's query: q_lat for columns < LORA, q_pe after.
    var qs: array<f32, 80>; // HG x MAX_CPL
    for (var hh = 0u; hh < HG; hh++) {
        let h = min(h0 + hh, p.heads - 1u);
        let head = t * p.heads + h;
        for (var j = 0u; j < cpl; j++) {
            let c = lane + WG * j;
            var v = 0.0;
            if (c < LORA) {
                v = q_lat[head * LORA + c];
            } else if (c < latent) {
                v = q[head * p.qk + p.nope + (c - LORA)];
            }
            qs[hh * MAX_CPL + j] = v;
        }
    }
    var o: array<f32, 64>; // HG x ceil(LORA / 64)
    for (var i = 0u; i < 64u; i++) {
        o[i] = 0.0;
    }
    // Running max and sum per head, kept by every lane alike.
    var m: array<f32, 8>;
    var l: array<f32, 8>;
    for (var hh = 0u; hh < 8u; hh++) {
        m[hh] = -3.4e38;
        l[hh] = 0.0;
    }
    let lora_cpl = (LORA + WG - 1u) / WG;
    for (var p0 = begin; p0 < end; p0 += TP) {
        // The lane's columns of the tile's rows (rows past the end read as zero).
        var rows: array<f32, 40>; // TP x MAX_CPL
        for (var pp = 0u; pp < TP; pp++) {
            let pos = p0 + pp;
            let first = attended_row(t, min(pos, end - 1u)) * latent;
            for (var j = 0u; j < cpl; j++) {
                let c = lane + WG * j;
                var v = 0.0;
                if (pos < end && c < latent) {
                    v = cache_at(first + c);
                }
                rows[pp * MAX_CPL + j] = v;
            }
        }
        var dots: array<f32, 32>;
        for (var hh = 0u; hh < HG; hh++) {
            for (var pp = 0u; pp < TP; pp++) {
                var s = 0.0;
                for (var j = 0u; j < cpl; j++) {
                    s += qs[hh * MAX_CPL + j] * rows[pp * MAX_CPL + j];
                }
                dots[hh * TP + pp] = s;
            }
        }
        let score = sum_over_lanes(dots, HG * TP, ids);
        if (lane < HG * TP) {
            probs[lane] = select(-3.4e38, score * p.scale, p0 + lane % TP < end);
        }
        workgroupBarrier();
        // Online softmax per head (every lane computes the same values from workgroup memory).
        for (var hh = 0u; hh < HG; hh++) {
            var top = m[hh];
            for (var pp = 0u; pp < TP; pp++) {
                top = max(top, probs[hh * TP + pp]);
            }
            let a = exp(m[hh] - top);
            var sum = 0.0;
            var e: array<f32, 4>;
            for (var pp = 0u; pp < TP; pp++) {
                e[pp] = select(0.0, exp(probs[hh * TP + pp] - top), p0 + pp < end);
                sum += e[pp];
            }
            l[hh] = l[hh] * a + sum;
            m[hh] = top;
            for (var j = 0u; j < lora_cpl; j++) {
                var acc = o[hh * lora_cpl + j] * a;
                for (var pp = 0u; pp < TP; pp++) {
                    acc += e[pp] * rows[pp * MAX_CPL + j];
                }
                o[hh * lora_cpl + j] = acc;
            }
        }
        workgroupBarrier(); // probs is rewritten by the next tile
    }
    for (var hh = 0u; hh < HG; hh++) {
        let h = h0 + hh;
        if (h >= p.heads) {
            break;
        }
        let out = ((t * p.heads + h) * p.splits + split) * (2u + LORA);
        if (lane == 0u) {
            split_out[out] = m[hh];
            split_out[out + 1u] = l[hh];
        }
        for (var j = 0u; j < lora_cpl; j++) {
            let c = lane + WG * j;
            if (c < LORA) {
                split_out[out + 2u + c] = o[hh * lora_cpl + j];
            }
        }
    }
}

// o_lat[t, h] = sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s over the splits. One workgroup
// per (head, token).
@compute @workgroup_size(64)
fn merge(@builtin(workgroup_id) wid: vec3<u32>, ids: LaneIds) {
    let head = wid.y * p.heads + wid.x;
    let stride = 2u + LORA;
    let base = head * p.splits * stride;
    var top = -3.4e38;
    for (var s = 0u; s < p.splits; s++) {
        top = max(top, split_out[base + s * stride]);
    }
    var total = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        total += split_out[base + s * stride + 1u] * exp(split_out[base + s * stride] - top);
    }
    for (var c = ids.lane; c < LORA; c += WG) {
        var acc = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            acc += split_out[base + s * stride + 2u + c] * exp(split_out[base + s * stride] - top);
        }
        o_lat[head * LORA + c] = acc / total;
    }
}
