// Rounding activations to 8 bits a 32-element block (--activations int8) as the cpu backend does
// (spmd/backends/cpu.py `_prepare_int8`): d = max |x| / 127, q = rint(x * (1 / d)), each step rounded to float32.
// A GPU's float division need not be correctly rounded (Vulkan allows 2.5 ulp), nor its fma fused (lavapipe's is
// not), and a scale an ulp off moves the q of an x near a rounding boundary: both divisions are done here exactly
// (`divided`: a float division's estimate corrected in 32-bit integers) and rounded to nearest even as IEEE division
// is, so that the same x gives the cpu's integers (float64 would do it too, but many GPUs lack it). A block whose
// largest value is over 2^22 (cpu.LIMIT), or NaN, gets d = NaN: its products come out NaN.
const float INT8_LIMIT = 4194304.0;
const float SMALLEST_NORMAL = 1.17549435e-38;
const uint INT8_NAN = 0x7FC00000u;  // the bits of the d of a block over the limit or with a NaN
// tests only (tests/test_vulkan_int8.py): `divided`'s estimate made this many units off, so that its correction
// runs on a device whose float division is exact (lavapipe's)
layout(constant_id = 5) const int ESTIMATE_SKEW = 0;

uint int8_pack(ivec4 q) {  // four 8-bit integers in a word, the first in the low byte
    return (uint(q.x) & 255u) | ((uint(q.y) & 255u) << 8) | ((uint(q.z) & 255u) << 16) | (uint(q.w) << 24);
}

float divided(float a, float b) {  // a / b rounded to nearest even, for a, b and the quotient normal floats > 0
    int ea, eb;
    float fa = frexp(a, ea), fb = frexp(b, eb);  // in [0.5, 1)
    uint na = uint(fa * 16777216.0), nb = uint(fb * 16777216.0);  // their 24-bit integer mantissas
    int e = ea - eb;  // a / b = (na / nb) 2^e
    if (na < nb) {
        na <<= 1;
        e -= 1;
    }
    // q = floor(na 2^24 / nb) (25 bits: the leading one, 23 kept, one to round by) and its remainder r: first
    // estimated with a float division (within a few units of q), then corrected in integers; r is exact modulo 2^32
    // in wrapping arithmetic, and small (|r| < 2^31): so its sign and value are exact
    uint q = uint(int(float(na) / float(nb) * 16777216.0) + ESTIMATE_SKEW);
    int r = int((na << 24) - q * nb);
    for (int i = 0; i < 64 && r < 0; i++) {
        q--;
        r += int(nb);
    }
    for (int i = 0; i < 64 && r >= int(nb); i++) {
        q++;
        r -= int(nb);
    }
    uint kept = q >> 1;
    if ((q & 1u) != 0u && (r != 0 || (kept & 1u) != 0u)) kept++;  // past half, or half and odd
    return ldexp(float(kept), e - 23);  // (kept may reach 2^24: still exact)
}

float int8_scale(float m) {  // m / 127 (0 for 0; below 127 x 2^-126, a block all but zero, whose quotient is
    // subnormal: the device's own division, which may differ from the cpu's in the last bit or flush to zero)
    return m >= 127.0 * SMALLEST_NORMAL ? divided(m, 127.0) : m / 127.0;
}

float int8_inverse(float d) {  // 1 / d (0 for d = 0)
    if (!(d > 0.0)) return 0.0;
    return d >= SMALLEST_NORMAL && d < 8.5e37 ? divided(1.0, d) : 1.0 / d;
}

vec2 int8_block(float m, bool bad) {  // a block's (d, 1 / d) from its largest |x|; bad (a value over the limit, or
    // a NaN): (NaN, -1), whose integers are 0 and products NaN
    if (bad) return vec2(uintBitsToFloat(INT8_NAN), -1.0);
    float d = int8_scale(m);
    return vec2(d, int8_inverse(d));
}

int int8_round(float x, vec2 s) {  // x's integer in its block of scale s (`int8_block`)
    return s.y < 0.0 ? 0 : int(roundEven(x * s.y));
}

ivec4 int8_round(vec4 x, vec2 s) {
    return s.y < 0.0 ? ivec4(0) : ivec4(roundEven(x * s.y));
}
