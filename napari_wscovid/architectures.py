"""The names every layer shares: the three methods' architecture ids and the negative class.

The lowest module of the package (imports nothing): weights files, the registry, the methods,
the widgets and the training package all spell these names from here.
"""

#: Hu et al. 2020, weakly supervised multi-scale learning (the default method).
WSNET = "wsnet-hu2020"
#: Zheng et al. 2020, DeCoVNet.
DECOVNET = "decovnet-zheng2020"
#: Wu et al. 2021, FeCNN with lesion typing.
FECNN = "fecnn-wu2021"

#: The class meaning "no pneumonia" in every bundled task.
NEGATIVE_CLASS = "NP"
