"""The paper's comparison methods, each a module of its own, selected with
``lafn evaluate --method methods/<name>-<backbone>`` (a config whose ``method.class_path`` names one
of the classes below; docs/locate_then_edit.md, docs/baselines/README.md).

    from lafn_lightning.methods.rome import RomeMethod        # M-ROME  } low-rank edit artifacts with
    from lafn_lightning.methods.memit import MemitMethod      # M-MEMIT } per-language key statistics
    from lafn_lightning.methods.pmet import PmetMethod        # M-PMET  }
    from lafn_lightning.methods.lora_ft import LoraFtMethod   # LoRA-FT through PEFT
    from lafn_lightning.methods.remake import RemakeMethod    # ReMaKE: retrieval + in-context

Each has ``name`` and an ``edited(model, tokenizer, groups, workdir)`` context manager
(:class:`lafn_lightning.methods.base.EditMethod`).
"""
