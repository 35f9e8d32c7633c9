"""The baselines distbelief is measured against, part of the package so that ``distbelief
bench`` runs from an installed wheel: plain PyTorch loops (:mod:`.plain`) and Hogwild
(:mod:`.hogwild`, PyTorch's ``mnist_hogwild`` pattern)."""
