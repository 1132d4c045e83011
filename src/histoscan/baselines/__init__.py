"""Classical baselines (logistic regression, random forest) on pixels and on colour/texture features."""
