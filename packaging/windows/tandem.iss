; Inno Setup 6 script for Tandem (Windows x64). Built by packaging\windows\build_windows.ps1, which runs
;   iscc /DAppVersion=<version> /DSourceDir=<PyInstaller folder> /DIconFile=<tandem.ico> /DOutputDir=<dir> tandem.iss
; Per-user install by default (no admin prompt); the user may choose all users on the first page.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef SourceDir
  #define SourceDir "..\dist\pyinstaller\tandem"
#endif
#ifndef IconFile
  #define IconFile "..\build\icons\tandem.ico"
#endif
#ifndef OutputDir
  #define OutputDir "..\dist"
#endif

[Setup]
AppId={{5C0E4B2A-7D1F-4E8B-9A63-2F4D8B1C7E90}
AppName=Tandem
AppVersion={#AppVersion}
AppPublisher=Tandem developers
DefaultDirName={autopf}\Tandem
DefaultGroupName=Tandem
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir={#OutputDir}
OutputBaseFilename=tandem-{#AppVersion}-windows-x64-setup
SetupIconFile={#IconFile}
UninstallDisplayIcon={app}\tandem.exe
Compression=lzma2/max
SolidCompression=yes
LZMANumBlockThreads=4
WizardStyle=modern
LicenseFile=..\..\LICENSE

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Files]
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{autoprograms}\Tandem"; Filename: "{app}\tandem.exe"
Name: "{autodesktop}\Tandem"; Filename: "{app}\tandem.exe"; Tasks: desktopicon

[Run]
Filename: "{app}\tandem.exe"; Description: "{cm:LaunchProgram,Tandem}"; Flags: nowait postinstall skipifsilent

[UninstallDelete]
; Python writes bytecode caches next to the kernel sources it compiles; chats and models in the
; user's data folder are left alone.
Type: filesandordirs; Name: "{app}\_internal\kernels\__pycache__"
