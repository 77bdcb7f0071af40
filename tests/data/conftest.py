from tests.data_prep.conftest import other_spm_model, sp, spm_model, wt_file, wt_lines  # noqa: F401
