"""DualOpt's own C code: the one kernel that paid for itself (torch's Adam finetune step and pull).

``dualopt_cpu.c`` is the kernel; :mod:`dualopt.native._build` compiles and loads
it under the safe-cache rules; :mod:`dualopt.torch._native` binds it for the
torch adapter, behind that adapter's one delegation point. Nothing here imports
a framework.
"""
