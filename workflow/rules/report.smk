# What a researcher reads: the most and least helpful episodes per query and method, how far the methods and
# preconditioners agree, plots, and one self-contained HTML page. Reads the merged tables only (no torch).


rule report:
    input:
        unpack(report_inputs),
    output:
        page=report("results/{run}/report/index.html", caption="../report/page.rst", category="Attribution",
                    labels={"run": "{run}", "what": "page"}),
        episodes=report("results/{run}/report/top_episodes.csv", caption="../report/top_episodes.rst",
                        category="Attribution", labels={"run": "{run}", "what": "top and bottom episodes"}),
        agreement=report("results/{run}/report/agreement.csv", caption="../report/agreement.rst",
                         category="Agreement", labels={"run": "{run}", "what": "method pairs"}),
        stability=report("results/{run}/report/preconditioner_stability.csv", caption="../report/stability.rst",
                         category="Agreement", labels={"run": "{run}", "what": "with and without preconditioner"}),
        agreement_plot=report("results/{run}/report/agreement.png", caption="../report/agreement_plot.rst",
                              category="Agreement", labels={"run": "{run}", "what": "heat map"}),
        distributions=report("results/{run}/report/score_distributions.png", caption="../report/distributions.rst",
                             category="Attribution", labels={"run": "{run}", "what": "score distributions"}),
        words=report("results/{run}/report/words.csv", caption="../report/words.rst", category="Words",
                     labels={"run": "{run}", "what": "influence by target word"}),
        word_difficulty=report("results/{run}/report/word_difficulty.csv", caption="../report/words.rst",
                               category="Words", labels={"run": "{run}", "what": "hard words"}),
    params:
        top_k=lambda wc: run_cfg(wc)["report"]["top_k"],
        queries_shown=lambda wc: run_cfg(wc)["report"]["queries_shown"],
        words_k=lambda wc: run_cfg(wc)["report"]["words_k"],
        title=lambda wc: f"Attribution report: {wc.run} ({run_cfg(wc)['description']})",
        ensemble=ensemble_size,
        checkpoints=lambda wc: run_cfg(wc)["attribution"]["checkpoints"],
        # the scored adapters' epochs: attribution.scoring_training's where it sets them
        epochs=lambda wc: scored_epochs(run_cfg(wc)),
        scoring_training=lambda wc: run_cfg(wc)["attribution"]["scoring_training"],
        training_seed=lambda wc: run_cfg(wc)["training"]["seed"],
        code=script_code("report.py"),
    log:
        "logs/{run}/report.log",
    benchmark:
        "benchmarks/{run}/report.tsv"
    resources:
        mem_mb=table_mem_mb,
    conda:
        CONDA_ENV
    script:
        "../scripts/report.py"
