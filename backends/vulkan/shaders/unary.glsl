// The unary functions, by the core's UnaryOp ids: the elementwise shader's unary ops, and the activation epilogue of
// the matmul shaders (matmul.comp, matvec.comp).

const float SQRT1_2 = 0.70710678118654752;

float erf_approx(float x) {
    // Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
    float t = 1.0 / (1.0 + 0.3275911 * abs(x));
    float y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * exp(-x * x);
    return x < 0.0 ? -y : y;
}

float tanh_safe(float x) {
    float t = exp(-2.0 * abs(x));
    float y = (1.0 - t) / (1.0 + t);
    return x < 0.0 ? -y : y;
}

float sigmoid(float x) { return 1.0 / (1.0 + exp(-x)); }

float unary(uint f, float x) {
    switch (f) {
        case 0u: return -x;
        case 1u: return exp(x);
        case 2u: return log(x);
        case 3u: return sqrt(x);
        case 4u: return 1.0 / sqrt(x);
        case 5u: return 1.0 / x;
        case 6u: return x * x;
        case 7u: return abs(x);
        case 8u: return tanh_safe(x);
        case 9u: return sigmoid(x);
        case 10u: return max(x, 0.0);
        case 11u: return x * sigmoid(x);
        case 12u: return 0.5 * x * (1.0 + erf_approx(x * SQRT1_2));
        case 13u: return 0.5 * x * (1.0 + tanh_safe(0.7978845608028654 * (x + 0.044715 * x * x * x)));
        case 14u: return x * sigmoid(1.702 * x);
        case 15u: return sin(x);
        default: return cos(x);
    }
}
