"""Coverage of the Router class (150 dev groups [+ 10k zsre distractors]) from precomputed states."""
import torch, collections, json, time, argparse
import os; WORK=os.environ.get("ROUTER_WORK", "runs/router_work"); os.makedirs(WORK, exist_ok=True)  # states and results
torch.set_num_threads(1)
from lafn_lightning.editing.prompts import subject_span, last_token_of_span
from lafn_lightning.data import load_groups
from lafn_lightning.routing.router import Router
from lafn_lightning.routing.keys import KeyStore
from lafn_lightning.routing.build import aligned_token
ap=argparse.ArgumentParser(); ap.add_argument("--layer",type=int,default=5); ap.add_argument("--distractors",type=int,default=0)
ap.add_argument("--tau-high",type=float,required=True); ap.add_argument("--tau-low",type=float,required=True); ap.add_argument("--index",default="auto"); ap.add_argument("--stage1",default="exact"); ap.add_argument("--candidates",type=int,default=1); ap.add_argument("--lookup",default="auto")
ap.add_argument("--tiers",default="",help="further lexical tiers share:cosine,... (Router lexical_tiers)")
ap.add_argument("--aliases",action="store_true",help="aligned prompts' mention aliases (routing.build.group_aliases)")
ap.add_argument("--no-edges",action="store_true",help="Router(edges=False): one spelled end suffices for every tier")
ap.add_argument("--calibrate-one-end",action="store_true",help="print the one-end tier's cosine: just above the best one-end-only score of the even-line zsre-train negatives (held out: odd lines)")
ap.add_argument("--common-from",type=int,default=0,help="Router(common_from=): subjects spelled by this many background facts need their state (0: off)")
ap.add_argument("--last-word-keys",action="store_true",help="more anchor keys: the subject tokens that start inside its last word (not its first or last token)")
ap.add_argument("--out"); a=ap.parse_args()
tiers=[tuple(map(float,t.split(":"))) for t in a.tiers.split(",") if t]
D=torch.load(WORK+"/dev_states.pt")
L=D["layers"]; recs=D["recs"]; enc=D["enc"]; S=D["states"]; li=L.index(a.layer)
groups={g.group_id:g for g in load_groups(__import__("lafn_lightning.data", fromlist=["x"]).default_dataset())}
gids=list(groups); langs=list(groups[gids[0]].edits)
by=collections.defaultdict(dict)
for i,r in enumerate(recs): by[(r[0],r[1])][r[2]]=i
cal=[i for i,r in enumerate(recs) if r[2]=="neg" and int(r[0].split(":")[1])%2==0]
mu=torch.cat([S[i][li,1:].float() for i in cal]).mean(0)
store=KeyStore(a.layer,{"name":"demo"},center=mu)
rules=collections.Counter(); aliases={}
if a.aliases:
    from transformers import AutoTokenizer
    from lafn_lightning.backbone.demo import ensure_demo_backbone
    from lafn_lightning.routing.build import group_aliases
    tok=AutoTokenizer.from_pretrained(ensure_demo_backbone(),local_files_only=True)
def extra_tokens(offs,subj):
    """--last-word-keys: the tokens of a subject at the start of its text that start inside its last word (the whole subject
    without word spaces), except the subject's first and last token"""
    toks=[t for t,(x,y) in enumerate(offs) if y>x and x<len(subj)]
    if not a.last_word_keys or len(toks)<3: return []
    lw=subj.rstrip().rfind(" ")+1
    return [t for t in toks[1:-1] if offs[t][0]>=lw]
for g in gids:
    anc=[]; extra=[]
    for lang in langs:
        i=by[(g,lang)]["anchor"]; subj=groups[g].edits[lang].subject
        p=last_token_of_span(enc[i][1],0,len(subj)); anc.append(store.project(S[i][li,p].float()))
        extra+=[store.project(S[i][li,t].float()) for t in extra_tokens(enc[i][1],subj)]
    anc=torch.stack(anc); keys=[anc]; sites=[]
    for lang in langs:
        i=by[(g,lang)]["prompt"]; e=groups[g].edits[lang]
        s0,s1,rule=subject_span(recs[i][3],e.subject,groups[g].subjects); st=store.project(S[i][li].float())
        if rule=="fallback": rule="aligned"; p=aligned_token(st,enc[i][1],anc,recs[i][3])
        else: p=last_token_of_span(enc[i][1],s0,s1)
        rules[rule]+=1; keys.append(st[p][None]); sites.append((lang,p,rule))
    if extra: keys.append(torch.stack(extra))
    store.add(g,torch.cat(keys),aliases=group_aliases(tok,groups[g],sites) if a.aliases else ())
subjects={g:groups[g].subjects for g in gids}
if a.distractors:
    DD=torch.load(WORK+"/distr_states.pt"); dl=DD["layers"].index(a.layer)
    per=collections.defaultdict(list)
    for k,r in enumerate(DD["recs"]):
        if r[0]<a.distractors: per[r[0]].append(k)
    for j,ks in per.items():
        anc=None; keys=[]; subj=None
        for k in ks:
            fid,lang,kind,text,s=DD["recs"][k]; offs=DD["enc"][k][1]; st=store.project(DD["states"][k][dl].float()); subj=s
            if kind=="anchor":
                anc=st[last_token_of_span(offs,0,len(s))][None]; keys.append(anc[0]); keys+=[st[t] for t in extra_tokens(offs,s)]; continue
            pos=text.find(s)
            p=last_token_of_span(offs,pos,pos+len(s)) if pos>=0 else None
            if p is None: p=aligned_token(st,offs,anc,text)
            keys.append(st[p])
        store.add(f"zsre:{j}",torch.stack(keys)); subjects[f"zsre:{j}"]=[subj]
if a.common_from:   # background-fact counts; a distractor's own zsRE line is not counted
    from lafn_lightning.routing.build import set_background_facts
    set_background_facts(store,subjects,own={g:int(g.split(":")[1]) for g in subjects if g.startswith("zsre:")})
t0=time.time()
router=Router(store,subjects,threshold=a.tau_high,lexical_threshold=a.tau_low,index=a.index,stage1=a.stage1,candidates=a.candidates,lexical_tiers=tiers,lookup=a.lookup,edges=not a.no_edges,common_from=a.common_from)
print(f"router: {len(router)} groups, {store.n_keys} keys, hnsw={router.index.uses_hnsw}, prompt-key rules {dict(rules)}, "
      f"tiers {router.lexical_tiers}, aliases {sum(map(len,store.all_aliases().values()))}, common {sum(map(router.is_common,subjects))}",flush=True)
if a.calibrate_one_end:   # docs/router.md, "Design decisions"
    from lafn_lightning.routing.router import site_tokens, calibrate_threshold
    def one_end_score(i):
        """best cosine over the groups with only one end of a subject spelled (>= lexical_min)"""
        cand=site_tokens(enc[i][1]); proj=router.project(S[i][li].float()[cand]); best=-1.0
        for g,(both,one) in router._lexical.end_supports(recs[i][3]).items():
            if both<router.lexical_min and g in router._group_rows:
                best=max(best,float((proj@torch.from_numpy(router.index._vecs[list(router._group_rows[g])]).T).max()))
        return best
    negs=[(i,int(r[0].split(":")[1])%2) for i,r in enumerate(recs) if r[2]=="neg"]
    ev=[one_end_score(i) for i,odd in negs if not odd]; od=[one_end_score(i) for i,odd in negs if odd]
    c=calibrate_threshold(ev,0.0)
    print(f"one-end tier cosine {c:.6f} (even-line negatives: {sum(x>-1 for x in ev)} of {len(ev)} have a one-end-only candidate, best {max(ev):.4f}); "
          f"held-out odd lines at or above it: {sum(x>=c for x in od)} of {len(od)} (best {max(od):.4f})",flush=True)
tab=collections.defaultdict(lambda:[0,0,0,0,0]); stages=collections.Counter(); sites=collections.Counter(); fails=[]; lochits=[]
t0=time.time()
for i,r in enumerate(recs):
    if r[2] not in ("prompt","rephrase","portability","locality"): continue
    routes=router.route(r[3],enc[i][1],S[i][li].float())
    c=tab[r[1]]
    if r[2]=="locality":
        c[3]+=1; c[2]+=bool(routes)
        if routes: lochits.append((r[1],r[3],[(x.group_id,x.stage,round(x.score,3)) for x in routes]))
        continue
    c[1]+=1; mine=[x for x in routes if x.group_id==r[0]]
    c[4]+=any(x.group_id!=r[0] for x in routes)
    if mine:
        c[0]+=1; x=mine[0]; stages[x.stage]+=1
        e=groups[r[0]].edits[r[1]]; s0,s1,rule=subject_span(r[3],e.subject,groups[r[0]].subjects)
        if rule!="fallback": sites["agree" if last_token_of_span(enc[i][1],s0,s1)==x.position else "differ"]+=1
        else: sites["no-subject-string:"+x.rule]+=1
    else: fails.append((r[1],r[2],groups[r[0]].edits[r[1]].subject,r[3],[(x.group_id,x.stage) for x in routes]))
dt=time.time()-t0
print(f"{'lang':5}{'found%':>9}{'false%':>9}{'other%':>9}")
T=[0]*5
for l in langs:
    c=tab[l]; T=[x+y for x,y in zip(T,c)]
    print(f"{l:5}{100*c[0]/c[1]:9.1f}{100*c[2]/c[3]:9.2f}{100*c[4]/c[1]:9.2f}")
print(f"{'all':5}{100*T[0]/T[1]:9.1f}{100*T[2]/T[3]:9.2f}{100*T[4]/T[1]:9.2f}   ({T[1]} probes, {T[3]} locality)")
print("found via stage:",dict(stages)," site vs training rule (subject_span):",dict(sites))
print(f"route() time incl. exact stage: {1e3*dt/(T[1]+T[3]):.2f} ms/query (contended CPU)")
if a.out: json.dump({"table":{l:tab[l] for l in langs},"aliases":{g:list(v) for g,v in store.all_aliases().items()},"stages":stages,"sites":sites,"fails":fails,"lochits":lochits},open(a.out,"w"),ensure_ascii=False,indent=0)
