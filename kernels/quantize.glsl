// Rounding activations to 8 bits a 32-element block (--activations int8) as the cpu backend does
// (spmd/backends/cpu.py `_prepare_int8`): d = max |x| / 127, q = rint(x * (1 / d)), each step rounded to float32.
// A GPU's float division need not be correctly rounded (Vulkan allows 2.5 ulp), nor its fma fused (lavapipe's is
// not), and a scale an ulp off moves the q of an x near a rounding boundary: both are taken from float64 products,
// which are correctly rounded (m / 127 as m times the float64 1 / 127: within 2^-52 of the quotient, which is
// never that close to a midpoint of two floats; 1 / d by one Newton step from the float quotient), so that the same
// x gives the cpu's integers. A block whose largest value is over 2^22 (cpu.LIMIT), or NaN, gets d = NaN: its
// products come out NaN.
const float INT8_LIMIT = 4194304.0;

float int8_scale(float m) {  // m / 127, correctly rounded
    return float(double(m) * (1.0lf / 127.0lf));
}

float int8_inverse(float d) {  // 1 / d (0 for d = 0), correctly rounded unless 1 / d is within 2^-45 of a midpoint
    if (!(d > 0.0)) return 0.0;
    double y = double(1.0 / d), e = 1.0lf - double(d) * y;  // (d * y is exact in float64)
    return float(y + y * e);
}
