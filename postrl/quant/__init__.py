"""Post-training quantization: quantized storage (``formats``) and model transforms (``model``).

    from postrl.quant import QuantSpec, quantize_model, model_nbytes
    quantize_model(model, "int4_g128")          # every Linear in the blocks, RTN int4, group 128
    model(tokens)                               # runs through the quantized layers

``formats`` is the one definition of quantized storage (int8 / packed int4 / NF4, scales per
group along K); every quantizer (RTN, GPTQ, AWQ, NF4) produces a ``QuantizedWeight`` and every
quantized matmul goes through ``formats.quantized_dot``. Calibration-based methods: GPTQ
(``gptq``), AWQ (``awq``), SmoothQuant W8A8 (``smoothquant``), and pruning (``prune``: magnitude,
Wanda, SparseGPT; unstructured or N:M), all fed by ``calibrate``.
"""

from postrl.quant.formats import (DOUBLE_QUANT_BLOCK, INT4_G128, INT8, NF4, NF4_BLOCK, NF4_DQ,
                                  NF4_LEVELS, QuantError, QuantizedWeight, QuantSpec, QuantStorage,
                                  dequantize_codes, double_dequantize, double_quantize,
                                  expand_groups, pack_int4, parse_spec, quant_params,
                                  quantize_codes, quantized_dot, rtn_quantize, unpack_int4)
from postrl.quant.model import (DEFAULT_TARGETS, dequantize_model, linear_layers, model_nbytes,
                                quantize_model, quantized_layers)
from postrl.quant.calibrate import LayerStats, calibrate, calibrate_sequential
from postrl.quant.gptq import gptq_quantize, gptq_quantize_model
from postrl.quant.awq import (awq_clip, awq_quantize, awq_quantize_model, awq_search_scale,
                              fold_scale)
from postrl.quant.smoothquant import (W8A8Weight, fake_quant_per_token, smooth_model,
                                      smoothing_scales, smoothquant_model)
from postrl.quant.prune import (magnitude_prune, prune_model, sparsegpt_prune, sparsity_of,
                                wanda_prune)
