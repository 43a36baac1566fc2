"""Static assets of ``report.html``: the script-error hook, the stylesheet and the page script
(inlined by :func:`crosscoder.analysis.report.render_report`; nothing is fetched)."""

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

JS = """
(function(){
const D=JSON.parse(document.getElementById('report-data').textContent);
const cols=D.table.columns, rows=D.table.rows, ci={}; cols.forEach((c,i)=>ci[c]=i);
let sortCol=ci['relative_norm']!==undefined?ci['relative_norm']:ci['pattern'], sortDir=-1, view=[];
const fmt=v=>v===null||v===undefined?'':(typeof v==='number'&&!Number.isInteger(v)?v.toPrecision(4):\
String(v));
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
function head(){const tr=document.getElementById('thead');tr.innerHTML='';\
cols.forEach((c,i)=>{const th=document.createElement('th');
 th.textContent=c+(i===sortCol?(sortDir>0?' \\u25b2':' \\u25bc'):'');\
th.onclick=()=>{sortDir=(i===sortCol)?-sortDir:-1;sortCol=i;render();};tr.appendChild(th);});}
function filtered(){const ke=document.getElementById('f-kind'), kd=ke?ke.value:'';
 const cls=document.getElementById('f-class').value, nc=document.getElementById('f-norm').value,
 fl=document.getElementById('f-flag').value, mf=parseFloat(document.getElementById('f-freq').value)||0,
 q=document.getElementById('f-latent').value.trim(), alive=document.getElementById('f-alive').checked,
 pe=document.getElementById('f-pattern'), pt=pe?pe.value.trim():'';
 return rows.filter(r=>(!cls||r[ci['class']]===cls)&&(!nc||r[ci['norm_class']]===nc)\
&&(!kd||r[ci['kind']]===kd)&&(!fl||(fl==='any'?r[ci['flag']]!=='':r[ci['flag']]===fl))&&(!pt||r[ci['pattern']]===pt)
  &&((r[ci['freq']]||0)>=mf)&&(!alive||!r[ci['dead']])&&(!q||String(r[ci['latent']]).startsWith(q)));}
function render(){head();view=filtered();view.sort((a,b)=>{const x=a[sortCol],y=b[sortCol];if(x===y)return 0;\
if(x===null)return 1;if(y===null)return -1;return (x<y?-1:1)*sortDir;});
 const limit=parseInt(document.getElementById('f-limit').value)||200, tb=document.getElementById('tbody');
 tb.innerHTML=view.slice(0,limit).map(r=>'<tr data-l="'+r[ci['latent']]+'">'+cols.map(c=>{const v=r[ci[c]];
  return '<td'+(c==='class'||c==='norm_class'?' class="c-'+v+'"':'')+'>'+esc(fmt(v))+'</td>';}).join('')+\
'</tr>').join('');
 document.getElementById('count').textContent=view.length+' of '+rows.length+' latents (showing '+\
Math.min(limit,view.length)+')';
 tb.querySelectorAll('tr').forEach(tr=>tr.onclick=()=>{\
tb.querySelectorAll('tr.sel').forEach(t=>t.classList.remove('sel'));tr.classList.add('sel');
  document.getElementById('card').innerHTML=card(parseInt(tr.dataset.l));});
 const n=parseInt(document.getElementById('f-cards').value)||0;
 document.getElementById('cards').innerHTML=view.slice(0,n).map(r=>card(r[ci['latent']])).join('');}
function ctxHtml(c){const mx=Math.max(1e-9,...c.acts);\
return c.tokens.map((t,i)=>{const a=Math.max(0,c.acts[i])/mx;
 return '<span class="tok'+(i===c.mark?' mark':'')+'" title="act '+fmt(c.acts[i])+\
'" style="background:rgba(255,140,0,'+a.toFixed(2)+')">'+\
esc(t).replace(/\\n/g,'\\u21b5')+'</span>';}).join('');}
function card(l){const r=rows.find(x=>x[ci['latent']]===l);if(!r)return '';const ctx=(D.contexts||{})[l];
 let h='<div class="card"><b>latent '+l+'</b> &mdash; <span class="c-'+r[ci['class']]+'">'+\
r[ci['class']]+'</span>'+(r[ci['flag']]?' (flag: '+r[ci['flag']]+')':'')+
 '<div class="meta">'+['kind','relative_norm','delta_norm','cos_sim','dec_norm_base','dec_norm_ft','freq',\
'mean_act','beta_ratio_error','beta_ratio_reconstruction','layout_check','layout_nu_error',\
'layout_nu_reconstruction','planted_class','planted_cos','match_latent','match_cos','match_class','pattern',\
'norm_class','ls_model'].concat(cols.filter(c=>/^(dec_norm_\\d+|nu_error_\\d+)$/.test(c)))
 .filter(c=>c in ci).map(c=>c+' '+esc(fmt(r[ci[c]]))).join(' &middot; ')+'</div>';
 if(ctx===undefined)h+='<div class="meta">no contexts stored for this latent (see max_cards)</div>';
 else if(!ctx.length)h+='<div class="meta">never fired on the scanned tokens</div>';
 else h+=ctx.map(c=>'<div class="ctx">'+ctxHtml(c)+'</div><div class="meta">act '+fmt(c.act)+\
' &middot; row '+c.row+' seq '+c.seq+' pos '+c.pos+
  ' &middot; projection on the latent direction: '+(c.proj?'per block (ls_model decoder) '+\
c.proj.map(fmt).join(', '):\
'base '+fmt(c.proj_base)+', fine-tuned '+fmt(c.proj_ft))+'</div>').join('');
 return h+'</div>';}
['f-class','f-norm','f-kind','f-flag','f-pattern','f-freq','f-latent','f-alive','f-limit','f-cards'].forEach(id=>{\
const e=document.getElementById(id);if(e){e.oninput=render;e.onchange=render;}});
render();
if(location.hash==='#table'){document.body.classList.add('table-view');\
const f=document.querySelector('#tbody tr');if(f)f.click();}
document.getElementById('status').textContent='ready';
})();
"""
