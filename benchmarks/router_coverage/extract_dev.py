import time, torch
import os; WORK=os.environ.get("ROUTER_WORK", "runs/router_work"); os.makedirs(WORK, exist_ok=True)  # states and results
torch.set_num_threads(1)
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.data import load_groups
from lafn_lightning.editing.prompts import anchor_text
from lafn_lightning.routing.states import encode_with_offsets, ids_states
LAYERS=[2,3,4,5,6,8]
m,t=load_backbone("demo","float32")
groups=load_groups(__import__("lafn_lightning.data", fromlist=["x"]).default_dataset())
recs=[]  # (gid, lang, kind, text)
for g in groups:
    for lang,e in g.edits.items():
        for kind,txt in [("prompt",e.prompt),("rephrase",e.rephrase),("portability",e.portability_prompt),("locality",e.locality_prompt),("anchor",anchor_text(lang,e.subject))]:
            if txt: recs.append((g.group_id,lang,kind,txt))
langs=list(groups[0].edits)
for lang in langs:
    lines=["\t".join(qa) for qa in __import__("lafn_lightning.data", fromlist=["x"]).read_zsre_train(lang)]
    for i,l in enumerate(lines[:150]):
        recs.append((f"zsre:{i}",lang,"neg",l.split("\t")[0].strip()))
print(len(recs),flush=True)
enc=[encode_with_offsets(t,r[3]) for r in recs]
t0=time.time()
st=ids_states(m,[e[0] for e in enc],LAYERS,batch_size=48,pad_id=t.pad_token_id)
print("time",time.time()-t0,flush=True)
torch.save({"layers":LAYERS,"recs":recs,"enc":enc,"states":[s.half() for s in st]},WORK+"/dev_states.pt")
print("done")
