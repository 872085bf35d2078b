"""The paper's comparison methods, each a module of its own (work in progress: not yet selectable from
``lafn fit``/``lafn evaluate``; see docs/locate_then_edit.md and docs/baselines/README.md).

    from lafn_lightning.methods.memit import MEMIT            # M-ROME / M-MEMIT / M-PMET: edit artifacts
    from lafn_lightning.methods.lora_ft import LoRAFineTune   # LoRA-FT through PEFT
    from lafn_lightning.methods.remake import ReMaKE          # retrieval + in-context
"""
