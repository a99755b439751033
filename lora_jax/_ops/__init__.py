"""Operations on parameter and adapter trees: config, init, merge, quantize, residual,
combine, optimizer, sharding, summary, bank slots."""
