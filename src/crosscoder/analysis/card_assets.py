"""The latent cards of ``report.html``: stylesheet and script (inlined before the page script of
:mod:`crosscoder.analysis.report_assets`; no library, nothing fetched).

``CARD_JS`` defines ``CC`` with ``fmt``, ``esc`` and ``card(latent, row, ci, D)``, which returns a card's
HTML from the latent's table row (``ci``: column -> index) and the page data ``D``:

* the class, its flag and pattern, and ``class_reason`` (:mod:`crosscoder.analysis.cards`);
* the activation histogram ``D.hist.latents[latent] = {hi, c}`` (bin ``b`` spans ``[b, b + 1) * hi /
  D.hist.bins``) as an inline SVG bar chart, one ``<rect>`` per bin with its range and count as a tooltip;
* the decoder norm per model (``dec_norm_<i>``, labels ``D.models``) as bars scaled to the largest, the
  models outside the latent's ``pattern`` greyed;
* Latent Scaling: the two-model ``beta_ratio_*`` fits, or ``nu_error_<i>``/``nu_reconstruction_<i>`` per
  model with the reference model (``ls_model``) marked; values over ``D.thresholds`` limits are red in
  the rows the classification checks (the fit of the latent's norm class; the absent models);
* the other metrics, and the top activating contexts with the activating token outlined and each token
  shaded by the latent's activation.
"""

CARD_CSS = """
.reason{margin:4px 0 6px;padding:4px 8px;background:#f3f6fb;border-left:3px solid #7a9cc6}
.cardgrid{display:flex;flex-wrap:wrap;gap:18px;margin:4px 0}.cardgrid h4,.card h4{margin:4px 0;font-size:13px}
.hist rect{fill:#e08a2b}.hist line{stroke:#999}.hist text{font-size:10px;fill:#555}
.bars,.nu{border-collapse:collapse;font-size:12px}.bars th,.nu th{text-align:left;font-weight:normal;\
padding:1px 6px 1px 0;white-space:nowrap}
.bars .track{width:160px;background:#f2f2f2}.bar{height:10px;background:#4a7fc1}.bar.absent{background:#bbb}
.num{text-align:right;padding:1px 4px;font-variant-numeric:tabular-nums}.nu td{min-width:54px}
.nu .tested th{font-weight:600}.nu td.over{color:#c00;font-weight:600}
"""

CARD_JS = r"""
const CC=(function(){
const fmt=v=>v===null||v===undefined?'':
 (typeof v==='number'&&!Number.isInteger(v)?v.toPrecision(4):String(v));
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));}
const idx=c=>{const m=/_(\d+)$/.exec(c);return m?+m[1]:-1;};
const perModel=(ci,re)=>Object.keys(ci).filter(c=>re.test(c)).sort((a,b)=>idx(a)-idx(b));
function hist(h,bins){
 if(!h||!bins)return '<div class="meta">no histogram: never fired on the scanned tokens, or not among the '+
  'latents with cards (max_cards)</div>';
 const c=h.c,n=c.length,w=h.hi/bins,W=320,H=64,bw=W/n,mx=Math.max(...c),tot=c.reduce((a,b)=>a+b,0);
 let s='<svg class="hist" data-total="'+tot+'" width="'+W+'" height="'+(H+14)+'" viewBox="0 0 '+W+' '+(H+14)+
  '">';
 c.forEach((k,i)=>{const bh=k?Math.max(1,H*k/mx):0;
  s+='<rect x="'+(i*bw).toFixed(1)+'" y="'+(H-bh).toFixed(1)+'" width="'+Math.max(1,bw-1).toFixed(1)+
   '" height="'+bh.toFixed(1)+'"><title>'+fmt(i*w)+' to '+fmt((i+1)*w)+': '+k+'</title></rect>';});
 s+='<line x1="0" y1="'+H+'" x2="'+W+'" y2="'+H+'"></line><text x="0" y="'+(H+12)+'">0</text><text x="'+W+
  '" y="'+(H+12)+'" text-anchor="end">'+fmt(n*w)+'</text></svg>';
 return s+'<div class="meta">'+tot+' nonzero activations on the scanned tokens; '+n+' bins of width '+fmt(w)+
  '; tallest bin '+mx+'</div>';}
function present(r,ci){const p=ci.pattern!==undefined?r[ci.pattern]:null;
 return p===null||p===undefined?null:(p===''?[]:String(p).split('+').map(Number));}
function label(D,m){const s=(D.models||[])[m]||'',t=s.length>40?s.slice(0,16)+'\u2026'+s.slice(-22):s;
 return '<span class="mlab" title="'+esc(s)+'">'+m+(t?' '+esc(t):'')+'</span>';}
function normBars(r,ci,D){let cs=perModel(ci,/^dec_norm_\d+$/);
 if(!cs.length)cs=['dec_norm_base','dec_norm_ft'].filter(c=>c in ci);
 if(!cs.length)return '';
 const v=cs.map(c=>r[ci[c]]),mx=Math.max(1e-30,...v.map(x=>x||0)),pat=present(r,ci);
 return '<table class="bars">'+cs.map((c,i)=>{const m=idx(c)>=0?idx(c):i,on=!pat||pat.includes(m);
  return '<tr><th>'+label(D,m)+(on?'':' (absent)')+'</th><td class="track"><div class="bar'+
   (on?'':' absent')+'" style="width:'+(100*Math.max(0,v[i]||0)/mx).toFixed(1)+'%"></div></td>'+
   '<td class="num">'+esc(fmt(v[i]))+'</td></tr>';}).join('')+'</table>';}
function nuCell(v,max,tested){if(v===null||v===undefined)return '<td class="num">NaN</td>';
 return '<td class="num'+(tested&&Math.abs(v)>max?' over':'')+'">'+esc(fmt(v))+'</td>';}
function nuTable(r,ci,D){const T=D.thresholds||{},me=T.nu_error_max,mr=T.nu_reconstruction_max;
 const g=c=>ci[c]!==undefined?r[ci[c]]:null;
 const lim='<div class="meta">limits |nu_e| &le; '+esc(me)+', |nu_r| &le; '+esc(mr)+
  (T.latent_scaling===false?' (Latent Scaling off)':'')+
  '; bold rows are checked, red is over the limit</div>';
 const head='<table class="nu"><tr><th></th><th>nu_e</th><th>nu_r</th></tr>';
 if('beta_ratio_error' in ci){const nc=g('norm_class');
  const fits=[['along the fine-tuned decoder','',nc==='ft_only'],['along the base decoder (mirror)','_mirror',
   nc==='base_only']];
  return head+fits.map(([name,s,t])=>'<tr'+(t?' class="tested"':'')+'><th>'+name+'</th>'+
   nuCell(g('beta_ratio_error'+s),me,t)+nuCell(g('beta_ratio_reconstruction'+s),mr,t)+'</tr>').join('')+'</table>'+lim;}
 const es=perModel(ci,/^nu_error_\d+$/);
 if(!es.length)return '<div class="meta">Latent Scaling not run</div>';
 const ref=g('ls_model'),pat=present(r,ci),claims=['exclusive','partial'].includes(g('norm_class'));
 return head+es.map(c=>{const m=idx(c),absent=pat&&!pat.includes(m),t=claims&&absent;
  return '<tr'+(t?' class="tested"':'')+'><th>'+label(D,m)+(m===ref?' (reference)':(absent?' (absent)':''))+
   '</th>'+nuCell(g(c),me,t)+nuCell(g('nu_reconstruction_'+m),mr,t)+'</tr>';}).join('')+'</table>'+lim;}
function ctxHtml(c){const mx=Math.max(1e-9,...c.acts);
 return c.tokens.map((t,i)=>{const a=Math.max(0,c.acts[i])/mx;
  return '<span class="tok'+(i===c.mark?' mark':'')+'" title="act '+fmt(c.acts[i])+
   '" style="background:rgba(255,140,0,'+a.toFixed(2)+')">'+esc(t).replace(/\n/g,'\u21b5')+'</span>';})
  .join('');}
const META=['kind','relative_norm','delta_norm','cos_sim','freq','mean_act','max_act','n_active',
 'layout_check','layout_nu_error','layout_nu_reconstruction','planted_class','planted_pattern','planted_cos','match_latent',
 'match_cos','match_class','norm_class','n_present','ls_model'];
function card(l,r,ci,D){if(!r)return '';
 const g=c=>ci[c]!==undefined?r[ci[c]]:undefined,ctx=(D.contexts||{})[l],H=D.hist||{};
 let h='<div class="card" data-latent="'+l+'"><b>latent '+l+'</b> &mdash; <span class="c-'+
  esc(g('class'))+'">'+esc(g('class'))+'</span>'+(g('flag')?' (flag: '+esc(g('flag'))+')':'')+
  (g('pattern')!==undefined?' &middot; pattern '+esc(g('pattern')||'none'):'');
 if(g('class_reason'))h+='<div class="reason">'+esc(g('class_reason'))+'</div>';
 h+='<div class="cardgrid"><div><h4>Activation histogram</h4>'+hist((H.latents||{})[l],H.bins)+'</div>'+
  '<div><h4>Decoder norm per model</h4>'+normBars(r,ci,D)+'</div>'+
  '<div><h4>Latent Scaling</h4>'+nuTable(r,ci,D)+'</div></div><div class="meta">'+
  META.concat(perModel(ci,/^(relative_norm|cos_sim)_\d+$/))
  .filter(c=>c in ci&&g(c)!==null&&g(c)!=='').map(c=>c+' '+esc(fmt(g(c)))).join(' &middot; ')+'</div>';
 h+='<h4>Top activating contexts</h4>';
 if(ctx===undefined)h+='<div class="meta">no contexts stored for this latent (see max_cards)</div>';
 else if(!ctx.length)h+='<div class="meta">never fired on the scanned tokens</div>';
 else h+=ctx.map(c=>'<div class="ctx">'+ctxHtml(c)+'</div><div class="meta">act '+fmt(c.act)+' &middot; row '+
  c.row+' seq '+c.seq+' pos '+c.pos+' &middot; projection on the latent direction: '+
  (c.proj?'per block (ls_model decoder) '+c.proj.map(fmt).join(', '):'base '+fmt(c.proj_base)+', fine-tuned '+
  fmt(c.proj_ft))+'</div>').join('');
 return h+'</div>';}
return {fmt:fmt,esc:esc,card:card};
})();
"""
