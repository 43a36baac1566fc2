"""Static assets of ``report.html``: the script-error hook, the stylesheet and the page script (table,
search and filters; the cards are :mod:`crosscoder.analysis.card_assets`), inlined by
:func:`crosscoder.analysis.report.render_report`; nothing is fetched."""

# Installed before any other script: errors (syntax errors of later scripts included), unhandled
# rejections and console.error calls are written into #js-errors, which headless tests read from the DOM.
HOOK = """
(function(){var e=document.getElementById('js-errors');
function add(s){e.textContent+=s+'\\n';\
e.setAttribute('data-count',String((+e.getAttribute('data-count')||0)+1));}
window.onerror=function(m,s,l,c){add('error: '+m+' ('+l+':'+c+')');};
window.addEventListener('unhandledrejection',function(ev){add('unhandled rejection: '+ev.reason);});
var ce=console.error;\
console.error=function(){add('console.error: '+Array.prototype.join.call(arguments,' '));\
ce.apply(console,arguments);};
})();
"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1400px;\
padding:12px 20px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:26px}
.kv{border-collapse:collapse;font-size:13px;margin:6px 0}.kv th,.kv td{border:1px solid #ddd;padding:3px 8px;\
text-align:left}
.figs img{max-width:48%;margin:4px;border:1px solid #eee}.note{color:#555;font-size:13px}
#controls{display:flex;gap:12px;flex-wrap:wrap;align-items:center;font-size:13px;margin:8px 0}
#latents{border-collapse:collapse;font-size:12px;width:100%}#latents th{position:sticky;top:0;\
background:#f4f4f4;cursor:pointer;user-select:none}
#latents th,#latents td{border:1px solid #e2e2e2;padding:2px 6px;text-align:right;white-space:nowrap}
#latents tr:hover td{background:#fffbe6}#latents tr.sel td{background:#ffe9a8}
.k-base_only{color:#1f77b4}.k-ft_only{color:#d62728}.k-designated_shared{color:#2ca02c}
.c-base_only{color:#1f77b4;font-weight:600}.c-ft_only{color:#d62728;font-weight:600}.c-shared{color:#2ca02c}\
.c-other{color:#888}.c-exclusive{color:#d62728;font-weight:600}.c-partial{color:#9467bd;font-weight:600}
.card{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:8px 0;font-size:13px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;margin:3px 0;padding:2px 4px;\
background:#fafafa;font-size:12px}
.tok{border-radius:2px}.mark{outline:2px solid #d62728}.meta{color:#666;font-size:11px}
#js-errors{color:#b00;white-space:pre-wrap}body.table-view .overview{display:none}
"""

JS = r"""
(function(){
const D=JSON.parse(document.getElementById('report-data').textContent);
const cols=D.table.columns, rows=D.table.rows, ci={}, byL={}, fmt=CC.fmt, esc=CC.esc;
const hidden=new Set(D.table.hidden||[]), shown=cols.filter(c=>!hidden.has(c));
cols.forEach((c,i)=>ci[c]=i); rows.forEach(r=>byL[r[ci['latent']]]=r);
// lower-case text searched per latent: its contexts' tokens
const ctxText={};
Object.entries(D.contexts||{}).forEach(([l,cs])=>{ctxText[l]=cs.map(c=>c.tokens.join('')).join('\n').toLowerCase();});
const SEARCHED=['class','norm_class','flag','pattern','class_reason'].filter(c=>c in ci);
let sortCol=ci['relative_norm']!==undefined?ci['relative_norm']:ci['pattern'], sortDir=-1, view=[];
function head(){const tr=document.getElementById('thead');tr.innerHTML='';
 shown.forEach(c=>{const i=ci[c], th=document.createElement('th');
 th.textContent=c+(i===sortCol?(sortDir>0?' \u25b2':' \u25bc'):'');
 th.onclick=()=>{sortDir=(i===sortCol)?-sortDir:-1;sortCol=i;render();};tr.appendChild(th);});}
function matches(r,q){if(!q)return true;const l=String(r[ci['latent']]);if(l===q)return true;
 if(SEARCHED.some(c=>String(r[ci[c]]===null?'':r[ci[c]]).toLowerCase().includes(q)))return true;
 const t=ctxText[l];return t!==undefined&&t.includes(q);}
function filtered(){const ke=document.getElementById('f-kind'), kd=ke?ke.value:'';
 const cls=document.getElementById('f-class').value, nc=document.getElementById('f-norm').value,
 fl=document.getElementById('f-flag').value, mf=parseFloat(document.getElementById('f-freq').value)||0,
 q=document.getElementById('f-latent').value.trim(), alive=document.getElementById('f-alive').checked,
 pe=document.getElementById('f-pattern'), pt=pe?pe.value.trim():'',
 s=document.getElementById('f-search').value.trim().toLowerCase();
 return rows.filter(r=>(!cls||r[ci['class']]===cls)&&(!nc||r[ci['norm_class']]===nc)
  &&(!kd||r[ci['kind']]===kd)&&(!fl||(fl==='any'?r[ci['flag']]!=='':r[ci['flag']]===fl))&&(!pt||r[ci['pattern']]===pt)
  &&((r[ci['freq']]||0)>=mf)&&(!alive||!r[ci['dead']])&&(!q||String(r[ci['latent']]).startsWith(q))&&matches(r,s));}
function card(l){return CC.card(l,byL[l],ci,D);}
function render(){head();view=filtered();view.sort((a,b)=>{const x=a[sortCol],y=b[sortCol];if(x===y)return 0;
 if(x===null)return 1;if(y===null)return -1;return (x<y?-1:1)*sortDir;});
 const limit=parseInt(document.getElementById('f-limit').value)||200, tb=document.getElementById('tbody');
 tb.innerHTML=view.slice(0,limit).map(r=>'<tr data-l="'+r[ci['latent']]+'">'+shown.map(c=>{const v=r[ci[c]];
  return '<td'+(c==='class'||c==='norm_class'?' class="c-'+esc(v)+'"':'')+'>'+esc(fmt(v))+'</td>';}).join('')+
  '</tr>').join('');
 document.getElementById('count').textContent=view.length+' of '+rows.length+' latents (showing '+
  Math.min(limit,view.length)+')';
 tb.querySelectorAll('tr').forEach(tr=>tr.onclick=()=>{
  tb.querySelectorAll('tr.sel').forEach(t=>t.classList.remove('sel'));tr.classList.add('sel');
  document.getElementById('card').innerHTML=card(parseInt(tr.dataset.l));});
 const n=parseInt(document.getElementById('f-cards').value)||0;
 document.getElementById('cards').innerHTML=view.slice(0,n).map(r=>card(r[ci['latent']])).join('');}
['f-search','f-class','f-norm','f-kind','f-flag','f-pattern','f-freq','f-latent','f-alive','f-limit','f-cards']
 .forEach(id=>{const e=document.getElementById(id);if(e){e.oninput=render;e.onchange=render;}});
// #table: the table view with the first card open; #q=TEXT: the same, searched for TEXT
if(location.hash.startsWith('#q='))document.getElementById('f-search').value=decodeURIComponent(location.hash.slice(3));
render();
if(location.hash==='#table'||location.hash.startsWith('#q=')){document.body.classList.add('table-view');
 const f=document.querySelector('#tbody tr');if(f)f.click();}
document.getElementById('status').textContent='ready';
})();
"""
