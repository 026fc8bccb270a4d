"""The mmcv 1.7.2 and mmengine 0.10.7 checkpoint surfaces, by concern.

- base: what both surfaces share (mmcv's dist info, logging, module-wrapper
  registry, version comparison, or equivalents without mmcv)
- mmcv, mmcv_save: mmcv.runner.checkpoint's load side and save side; users
  import them as ``ckptio.checkpoint`` (the same module object as
  ``ckptio.compat.mmcv``)
- mmengine, mmengine_save: mmengine.runner.checkpoint's; users import them as
  ``ckptio.mmengine``

Nothing is imported here: ``ckptio.compat.mmengine`` imports mmengine.
"""
