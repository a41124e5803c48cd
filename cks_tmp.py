import os, timeit, sys
d=os.urandom(1388)
N=200000
fb=int.from_bytes
f=lambda s: timeit.timeit(s, number=N, globals=globals())/N*1e6
print(sys.version.split()[0])
ref = fb(d,'big') % 0xFFFF
def swap(v): return ((v & 0xFF) << 8) | (v >> 8)
def a(d): return fb(d,'big') % 0xFFFF
def b(d): return fb(d,'little') % 0xFFFF
def c2(d): return (fb(d[:694],'little') + fb(d[694:],'little')) % 0xFFFF
def c4(d): return (fb(d[:348],'little') + fb(d[348:696],'little') + fb(d[696:1044],'little') + fb(d[1044:],'little')) % 0xFFFF
def c4b(d): return (fb(d[:348]) + fb(d[348:696]) + fb(d[696:1044]) + fb(d[1044:])) % 0xFFFF
M=(1<<5552)-1
def e(d):
    x = fb(d,'little'); x = (x >> 5552) + (x & M); return x % 0xFFFF
for fn in (a,b,c2,c4,c4b,e):
    v = fn(d)
    ok = v == ref or swap(v) == ref
    print(fn.__name__, '%.2f' % f(f"{fn.__name__}(d)"), ok)
