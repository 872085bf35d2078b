import torch, collections, sys, json
import os; WORK=os.environ.get("ROUTER_WORK","/work/scratch/i12_work")  # states and results
torch.set_num_threads(1)
from lafn_lightning.editing.prompts import subject_span, last_token_of_span
from lafn_lightning.data import load_groups
from lafn_lightning.text.matching import SubjectMatcher
from lafn_lightning.routing.lexical import lexical_support
from lafn_lightning.routing.router import calibrate_threshold
layer=int(sys.argv[1])
D=torch.load(WORK+"/dev_states.pt")
L=D["layers"]; recs=D["recs"]; enc=D["enc"]; S=D["states"]
groups={g.group_id:g for g in load_groups(__import__("lafn_lightning.data", fromlist=["x"]).default_dataset())}
gids=list(groups); gidx={g:k for k,g in enumerate(gids)}; langs=list(groups[gids[0]].edits)
by=collections.defaultdict(dict)
for i,r in enumerate(recs): by[(r[0],r[1])][r[2]]=i
neg=[i for i,r in enumerate(recs) if r[2]=="neg"]
cal=[i for i in neg if int(recs[i][0].split(":")[1])%2==0]; hold=[i for i in neg if int(recs[i][0].split(":")[1])%2==1]
probe=[i for i,r in enumerate(recs) if r[2] in ("prompt","rephrase","portability")]
loc=[i for i,r in enumerate(recs) if r[2]=="locality"]
li=L.index(layer)
X=torch.cat([S[i][li,1:].float() for i in cal]); mu=X.mean(0)
T=lambda x: torch.nn.functional.normalize(x-mu,dim=-1)
K=[]; own=[]; rules=collections.Counter()
for g in gids:
    anc=[]
    for lang in langs:
        i=by[(g,lang)]["anchor"]; subj=groups[g].edits[lang].subject
        p=last_token_of_span(enc[i][1],0,len(subj)); anc.append(T(S[i][li,p].float()))
    anc=torch.stack(anc); K.append(anc); own += [gidx[g]]*len(anc)
    for lang in langs:
        i=by[(g,lang)]["prompt"]; e=groups[g].edits[lang]
        s0,s1,rule=subject_span(recs[i][3],e.subject,groups[g].subjects)
        st=T(S[i][li].float())
        if rule=="fallback": rule="aligned"; p=1+int((st[1:]@anc.T).max(1).values.argmax())
        else: p=last_token_of_span(enc[i][1],s0,s1)
        rules[rule]+=1
        K.append(st[p][None]); own.append(gidx[g])
K=torch.cat(K); own=torch.tensor(own); G=len(gids)
print("prompt key rules",dict(rules),flush=True)
def gmax(idx):
    Q=torch.cat([T(S[i][li,1:].float()) for i in idx]); rid=torch.cat([torch.full((S[i].shape[1]-1,),k) for k,i in enumerate(idx)])
    out=torch.full((len(idx),G),-2.0)
    for a in range(0,len(Q),4096):
        sim=Q[a:a+4096]@K.T
        g=torch.full((sim.shape[0],G),-2.0).scatter_reduce(1,own.expand(sim.shape[0],-1),sim,"amax")
        out.scatter_reduce_(0,rid[a:a+4096,None].expand(-1,G),g,"amax")
    return out
allidx=cal+hold+probe+loc
M=gmax(allidx); pos={i:k for k,i in enumerate(allidx)}
torch.save({"M":M,"allidx":allidx,"gids":gids},f"{WORK}/M_L{layer}.pt")
def top(i):
    row=M[pos[i]]; g=int(row.argmax()); return g,float(row[g])
def lex(i,g): return lexical_support(recs[i][3],groups[gids[g]].subjects)
calt=[(top(i),i) for i in cal]
tau_high=calibrate_threshold([s for (g,s),i in calt],0.0)
LAM=0.5
tau_low=calibrate_threshold([s if lex(i,g)>=LAM else -1 for (g,s),i in calt],0.0025)
print(f"layer {layer}: tau_high={tau_high:.4f} tau_low(lex>={LAM})={tau_low:.4f}",flush=True)
def accept(i):
    g,s=top(i)
    return g if (s>=tau_high or (s>=tau_low and lex(i,g)>=LAM)) else None
hf=sum(accept(i) is not None for i in hold)/len(hold)
print(f"held-out zsre negatives false: {100*hf:.2f}%")
matchers={m:SubjectMatcher({g.group_id:g.subjects for g in groups.values()},mode=m) for m in ("exact","normalized","fuzzy")}
tab=collections.defaultdict(lambda:collections.defaultdict(lambda:[0,0,0,0]))  # method->lang->[found,n,locfalse,locn]
for i in probe:
    r=recs[i]; want=gidx[r[0]]
    found={m:{gidx[x.group_id] for x in mt.find(r[3])} for m,mt in matchers.items()}
    st=accept(i)
    res={**{m:want in f for m,f in found.items()},"state":st==want,"router":(want in found["exact"]) or st==want,"router+fuzzy":(want in found["fuzzy"]) or st==want}
    for m,v in res.items(): tab[m][r[1]][0]+=v; tab[m][r[1]][1]+=1
for i in loc:
    r=recs[i]
    found={m:bool(mt.find(r[3])) for m,mt in matchers.items()}
    st=accept(i) is not None
    res={**found,"state":st,"router":found["exact"] or st,"router+fuzzy":found["fuzzy"] or st}
    for m,v in res.items(): tab[m][r[1]][2]+=v; tab[m][r[1]][3]+=1
print(f"{'lang':5}"+"".join(f"{m:>18}" for m in tab))
for l in langs+["all"]:
    row=f"{l:5}"
    for m in tab:
        c=[sum(tab[m][x][k] for x in langs) for k in range(4)] if l=="all" else tab[m][l]
        row+=f"{100*c[0]/c[1]:9.1f}{100*c[2]/c[3]:9.2f}"
    print(row)
json.dump({m:{l:v for l,v in d.items()} for m,d in tab.items()},open(f"{WORK}/table150_L{layer}.json","w"))
