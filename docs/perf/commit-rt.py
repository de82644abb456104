#!/usr/bin/env python3
# MySQL round trips in an strace of the hub (docs/perf/commit-latency.txt):
# strace -f -tt -T -e trace=%network,epoll_wait,futex -p HUB -o OUT; commit-rt.py OUT [TEXT]
# Per command kind: each command sent -> first answer read on the same socket.
# With TEXT: those statements in time order with their round trip.
import re,sys,collections
# per-fd round trip: sendto with a MySQL command -> first recvfrom with data on the same fd
pat=re.compile(r'^(\d+)\s+(\d+):(\d+):([\d.]+) (sendto|recvfrom)\((\d+), (?:"(.*?)"(?:\.\.\.)?|<unfinished)')
pend={}; stats=collections.defaultdict(list)
lines=open(sys.argv[1]).read().splitlines()
for l in lines:
    m=pat.match(l)
    if not m: continue
    t=int(m.group(2))*3600+int(m.group(3))*60+float(m.group(4))
    call,fd,data=m.group(5),m.group(6),m.group(7) or ''
    if call=='sendto':
        if data=='' : continue
        # decode: 4-byte header (escaped) then command byte
        data=data[:40]; data=data[:-1] if data.endswith(chr(92)) and not data.endswith(chr(92)*2) else data
        try: s=data.encode().decode("unicode_escape").encode("latin1")
        except Exception: continue
        if len(s)<5: continue
        cmd=s[4]
        name={3:'Q',0x16:'PREPARE',0x17:'EXEC',0x1f:'RESET',0x19:'CLOSE',0x0e:'PING'}.get(cmd,hex(cmd))
        if cmd==3: name='Q:'+s[5:25].decode('latin1')
        if cmd==0x16: name='PREP:'+s[5:25].decode('latin1')
        pend[fd]=(t,name)
    else:
        if 'EAGAIN' in l or fd not in pend: continue
        t0,name=pend.pop(fd)
        stats[name].append((t-t0)*1000)
for k,v in sorted(stats.items(), key=lambda kv:-len(kv[1])):
    v.sort(); print(f"{len(v):6d} p50 {v[len(v)//2]:.3f} ms  p90 {v[int(len(v)*.9)]:.3f}  {k}")
if len(sys.argv)>2:
    # chronological list of one statement kind
    pend={}
    for l in lines:
        m=pat.match(l)
        if not m: continue
        t=int(m.group(2))*3600+int(m.group(3))*60+float(m.group(4))
        call,fd,data=m.group(5),m.group(6),m.group(7) or ''
        if call=='sendto' and sys.argv[2] in data: pend[fd]=t
        elif call=='recvfrom' and fd in pend and 'EAGAIN' not in l:
            print(f"{m.group(3)}:{m.group(4)} {(t-pend.pop(fd))*1000:.3f}", end='  ')
    print()
