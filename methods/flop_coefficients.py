"""The analytic decoder FLOPs of one layer per architecture, shared by the methods (which plan budgets with them)
and the harness (which checks executed FLOPs against them). Biases and norms are left out consistently, as the
executed count (bench.flops) leaves them out."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerFlopCoefficients:
    """F(n, m) = a·n + b·n·m + g·n for one decoder layer with n query and m key tokens.

    a: Q, K, V, O projections; b: QKᵀ and AV (counted full n×m, as the SDPA formula does); g: gated MLP.
    """

    a: int
    b: int
    g: int

    @classmethod
    def from_config(cls, config) -> LayerFlopCoefficients:
        d = config.hidden_size
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        q_dim = config.num_attention_heads * head_dim
        kv_dim = config.num_key_value_heads * head_dim
        a = 2 * d * (q_dim + 2 * kv_dim) + 2 * q_dim * d
        b = 2 * 2 * q_dim
        g = 2 * 3 * d * config.intermediate_size
        return cls(a=a, b=b, g=g)

    def attention(self, n: int, m: int | None = None) -> int:
        """The MHA sub-block: projections plus score/value products."""
        m = n if m is None else m
        return self.a * n + self.b * n * m

    def mlp(self, n: int) -> int:
        return self.g * n

    def layer(self, n: int, m: int | None = None) -> int:
        return self.attention(n, m) + self.mlp(n)


def analytic_decoder_flops(config, seq_len: int, batch: int = 1, num_layers: int | None = None) -> int:
    """Dense decoder FLOPs of a full forward over `seq_len` tokens."""
    coeff = LayerFlopCoefficients.from_config(config)
    layers = config.num_hidden_layers if num_layers is None else num_layers
    return batch * layers * coeff.layer(seq_len)
