"""A thin ``nn.Module`` per loss around :mod:`featkd.functional`, registered by name with its capabilities.

One module per loss family (``nst``, ``attention``, ``gram``, ``hint``, ``logits``, ...) defines the
modules and registers each where it is defined (:mod:`featkd.losses.registry`). Importing this package
imports every module in it, so a new loss is one new file here (plus its test):

* ``build_feature_loss(name, student_shape, teacher_shape, **options)`` checks the shapes (full tensor
  shapes from a dry-run forward) and the options when the loss is built, so a mismatch is reported
  before training starts; ``feature_loss_names()`` lists the names.
* ``build_logit_loss(name, **options)`` does the same for the logit terms; ``logit_loss_names()``.

Unknown names and options get close-match suggestions.
"""

import importlib
import pkgutil

from featkd.losses.registry import (BatchContext, build_feature_loss, build_logit_loss, feature_loss_class,
                                    feature_loss_names, logit_loss_names, register_feature_loss,
                                    register_logit_loss)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["BatchContext", "build_feature_loss", "build_logit_loss", "feature_loss_class", "feature_loss_names",
           "logit_loss_names", "register_feature_loss", "register_logit_loss"]
