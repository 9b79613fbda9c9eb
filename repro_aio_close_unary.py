import asyncio, threading, time
from hessian_client import Client, aio
A="127.0.0.1:47751"   # blackhole: accepts TCP, never answers
async def main():
    c=aio.Client(A, timeout=20); t=asyncio.create_task(c.get_run("r-x")); await asyncio.sleep(0.5); await c.close()
    try: await t
    except BaseException as e: print("aio unary:", type(e).__module__, type(e).__name__, repr(e)[:150])
asyncio.run(main())
c=Client(A, timeout=20); out={}
def f():
    try: c.get_run("r-x")
    except BaseException as e: out["e"]=e
th=threading.Thread(target=f); th.start(); time.sleep(0.5); c.close(); th.join(25)
e=out.get("e"); print("sync unary:", type(e).__module__, type(e).__name__, repr(e)[:150])
