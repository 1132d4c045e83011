"""Trust rules: applying the rules stored in ``model.json`` (referral, tissue check) to a prediction.

This layer sits below ``histoscan.inference``, which answers with it; fitting the rules (on predictions,
so above inference) is ``histoscan.trust``.
"""
