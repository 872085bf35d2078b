import time, torch
import os; WORK=os.environ.get("ROUTER_WORK", "runs/router_work"); os.makedirs(WORK, exist_ok=True)  # states and results
torch.set_num_threads(1)
from subj import template_subject
from lafn_lightning.backbone.loading import load_backbone
from lafn_lightning.editing.prompts import anchor_text
from lafn_lightning.routing.states import encode_with_offsets, ids_states
LAYERS=[4,5]
m,t=load_backbone("demo","float32")
langs="en cz de du es fr pt ru th tr vi zh".split()
Q={l:[x.split("\t")[0].strip() for x in ["\t".join(qa) for qa in __import__("lafn_lightning.data", fromlist=["x"]).read_zsre_train(l)]] for l in langs}
recs=[]
for i in range(10000):
    s=template_subject(Q["en"][i])
    recs.append((i,"en","anchor",anchor_text("en",s),s))
    recs.append((i,"en","question",Q["en"][i],s))
    o=langs[1+i%11]
    recs.append((i,o,"question",Q[o][i],s))
enc=[encode_with_offsets(t,r[3]) for r in recs]
print(len(recs),flush=True)
t0=time.time()
st=ids_states(m,[e[0] for e in enc],LAYERS,batch_size=64,pad_id=t.pad_token_id)
print("time",time.time()-t0,flush=True)
torch.save({"layers":LAYERS,"recs":recs,"enc":enc,"states":[s.half() for s in st]},WORK+"/distr_states.pt")
print("done",flush=True)
